"""MLflow lineage: one parent run per round, one child run per stage, artifacts as datasets with sha256 digests.

- A round's parent run is found again by its ``alignflow.round_key`` tag, so a re-run of a crashed round resumes
  the same parent run instead of opening a duplicate.
- Each stage's child run logs the stage's input artifacts (context ``input``) and output artifacts (context
  ``output``) as MLflow datasets whose digest is the artifact's sha256, the resolved stage config as params, and
  the stage metrics. ``alignflow lineage`` walks these digests backwards.
- Checkpoints are registered in the model registry by reference (the model directory stays where the artifact
  store put it; the version's ``source`` and tag ``alignflow.path`` point at it) with the alias ``candidate``.
All calls go through an explicit ``MlflowClient`` (no fluent active-run state), so tasks in worker threads or other
processes can log to the right run by id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline_lib.artifacts import ArtifactRef
from pipeline_lib.locks import store_lock

ROUND_KEY = "alignflow.round_key"
STAGE_TAG = "alignflow.stage"
FLOW_RUN_TAG = "prefect.flow_run_id"
PATH_TAG = "alignflow.path"
SHA_TAG = "alignflow.sha256"
CAMPAIGN_FINAL_TAG = "alignflow.campaign_final"  # the run comparing a campaign's first policy with its last checkpoint


def client(tracking_uri: str | None = None):
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = tracking_uri or mlflow.get_tracking_uri()
    # Opening a SQLite store creates its tables when they are missing; two processes doing it at once on a fresh
    # store: "sqlite3.OperationalError: table logged_models already exists" (issue 22). One at a time; both the
    # tracking and the registry store are opened here.
    with store_lock(uri):
        c = MlflowClient(tracking_uri=uri)
        c._get_registry_client().store  # noqa: B018  (creates the registry's tables under the lock)
    return c


def _experiment_id(c, name: str, tracking_uri: str = "") -> str:
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # MLflow artifacts (charts) beside the SQLite store, not in the cwd
        location = str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name)
    return c.create_experiment(name, artifact_location=location)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _dataset(ref: ArtifactRef):
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    return MetaDataset(source=LocalArtifactDatasetSource(os.path.abspath(ref.path)), name=ref.name,
                       digest=ref.sha256[:36])  # MLflow caps dataset digests at 36 characters


def log_artifacts_io(c, run_id: str, inputs: Mapping[str, ArtifactRef], outputs: Mapping[str, ArtifactRef]) -> None:
    from mlflow.entities import DatasetInput, InputTag

    entries = []
    for context, refs in (("input", inputs), ("output", outputs)):
        for role, ref in refs.items():
            tags = [InputTag("mlflow.data.context", context), InputTag("alignflow.role", role),
                    InputTag(SHA_TAG, ref.sha256)]
            entries.append(DatasetInput(_dataset(ref)._to_mlflow_entity(), tags))
    if entries:
        c.log_inputs(run_id, datasets=entries)


class RoundLineage:
    """Lineage of one round, addressed by run ids (safe to use from any thread or process)."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        with store_lock(tracking_uri):  # two rounds on a fresh store would both create the experiment
            self.new_experiment = self.client.get_experiment_by_name(experiment) is None  # a new store, for one
            self.experiment_id = _experiment_id(self.client, experiment, tracking_uri)

    def start_round(self, round_key: str, name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open (or re-open, after a crash) the parent run of the round identified by ``round_key``."""
        with store_lock(self.tracking_uri):  # two runs of one round at once: one parent run, not two
            return self._start_round(round_key, name, config, tags)

    def _start_round(self, round_key: str, name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{ROUND_KEY}` = '{round_key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:  # a re-run: its tags (e.g. the new flow run id) replace the crashed run's
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={ROUND_KEY: round_key, **tags})
            run_id = run.info.run_id
            # one call: the client splits it at MLflow's per-request caps (100 params), one transaction per chunk
            self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in _flatten(config).items()])
        return run_id

    def stage_run(self, parent_id: str, stage: str, inputs: Mapping[str, ArtifactRef],
                  outputs: Mapping[str, ArtifactRef], config: Mapping[str, Any], metrics: Mapping[str, float],
                  tags: Mapping[str, str] | None = None, step_metrics: list[dict] | None = None) -> str:
        """Record one finished stage as a child run of the round."""
        from mlflow.entities import Metric, Param, RunTag
        import time

        run = self.client.create_run(self.experiment_id, run_name=stage,
                                     tags={"mlflow.parentRunId": parent_id, STAGE_TAG: stage, **(tags or {})})
        rid = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in _flatten(config).items()]
        mets = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _is_number(v)]
        for row in step_metrics or []:
            step = int(row.get("step", 0))
            mets += [Metric(k.replace("/", "_"), float(v), now, step) for k, v in row.items()
                     if k != "step" and _is_number(v)]
        self.client.log_batch(rid, metrics=mets, params=params,  # the client splits at MLflow's per-request caps
                         tags=[RunTag(f"output.{k}", r.sha256) for k, r in outputs.items()])
        log_artifacts_io(self.client, rid, inputs, outputs)
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def register_checkpoint(self, run_id: str, model: ArtifactRef, registered_name: str, alias: str,
                            tags: Mapping[str, str] | None = None) -> str:
        """Register a checkpoint directory by reference and point ``alias`` at it; returns the version."""
        with store_lock(self.tracking_uri):  # one version per checkpoint even when two rounds register it at once
            return self._register(run_id, model, registered_name, alias, tags)

    def _register(self, run_id: str, model: ArtifactRef, registered_name: str, alias: str,
                  tags: Mapping[str, str] | None = None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(registered_name)
        except MlflowException:
            self.client.create_registered_model(registered_name)
        existing = self.client.search_model_versions(
            f"name = '{registered_name}' and tag.`{SHA_TAG}` = '{model.sha256}'")
        if existing:
            version = existing[0].version
        else:
            path = os.path.abspath(model.path)
            mv = self.client.create_model_version(registered_name, source=path, run_id=run_id,
                                                  tags={PATH_TAG: path, SHA_TAG: model.sha256, **(tags or {})})
            version = mv.version
        self.client.set_registered_model_alias(registered_name, alias, version)
        return str(version)

    def stage_seconds(self, parent_id: str, flow_run_id: str) -> float:
        """Total ``stage_s`` of the stage runs that this flow run logged under the round (cache hits log none)."""
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                     f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        return float(sum(r.data.metrics.get("stage_s", 0.0) for r in runs))

    def alias_version(self, registered_name: str, alias: str):
        """The model version an alias points at, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(registered_name, alias)
        except MlflowException:
            return None

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_name, alias, version)

    def seed_champion(self, run_id: str, seed: ArtifactRef, registered_name: str, work_dir: str | Path | None = None):
        """The champion's model version; when there is none, ``seed`` is registered as the champion first. Checked
        and set under the registry lock, so two first rounds at once agree on one champion."""
        with store_lock(self.tracking_uri, work_dir):
            mv = self.alias_version(registered_name, "champion")
            if mv is None:
                self._register(run_id, seed, registered_name, "champion", tags={"alignflow.seed": "true"})
                mv = self.alias_version(registered_name, "champion")
            return mv

    def promote(self, registered_name: str, expected: str, version: str,
                work_dir: str | Path | None = None) -> tuple[bool, str]:
        """Compare-and-set: point ``champion`` at ``version`` only if it still points at ``expected``, the version
        the candidate was evaluated against. Rounds with different configs used to promote over each other (the
        champion read before evaluation was never checked again before the alias moved). Returns (moved, why not)."""
        with store_lock(self.tracking_uri, work_dir):
            mv = self.alias_version(registered_name, "champion")
            current = str(mv.version) if mv is not None else None
            if current != str(expected):
                return False, (f"champion kept: it moved from v{expected} to v{current} while this round ran, and "
                               f"the candidate was compared with v{expected}")
            self.set_alias(registered_name, "champion", version)
            return True, ""

    def finish_round(self, run_id: str, metrics: Mapping[str, float], status: str = "FINISHED",
                     tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(run_id,
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if _is_number(v)],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
        self.client.set_terminated(run_id, status)


def _is_number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def registered_model_path(ref: str, tracking_uri: str | None = None) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> the local directory the version points at."""
    return registered_model_version(ref, tracking_uri)[0]


def registered_model_version(ref: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``models:/name@alias`` or ``models:/name/version`` -> (the local directory the version points at, the
    content digest recorded when it was registered, or None for a version registered by something else)."""
    from mlflow.exceptions import MlflowException

    body = ref.removeprefix("models:/")
    c = client(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = body.rsplit("/", 1)
            mv = c.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        from pipeline_lib.errors import ModelError

        raise ModelError(f"model {ref!r}: not found in the MLflow registry at {c.tracking_uri}: {e}") from None
    tags = mv.tags or {}
    return tags.get(PATH_TAG) or mv.source, tags.get(SHA_TAG)
