"""Gather what a report shows from MLflow (and the artifacts its runs point at).

A report target is a campaign name (parent runs tagged ``alignflow.campaign``), a round's parent run id, or any
stage run id (its round is reported). Everything is read through an explicit ``MlflowClient``; the only files read
are the pairs tables the ``pair`` stage runs logged as outputs, after checking their sha256 against the digest the
run recorded, so a report never shows numbers from an artifact that changed since the round.

A stage whose Prefect task was a cache hit logs no child run in the round that reused it. When the round's parent
run names its artifacts (tags ``alignflow.artifact.<name>`` = sha256), the stage run that produced each one (in an
earlier round) is found by its ``output.<role>`` tag and shown as reused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.lineage import CAMPAIGN_FINAL_TAG as FINAL_TAG
from pipeline_lib.lineage import ROUND_KEY, SHA_TAG, STAGE_TAG

CAMPAIGN_TAG = "alignflow.campaign"
ROUND_INDEX_TAG = "alignflow.round_index"
ARTIFACT_TAG = "alignflow.artifact."
STAGE_ORDER = ["prompts-train", "prompts-heldout", "collect", "annotate", "pair", "train", "evaluate-champion",
               "evaluate-candidate"]
# The round summary's artifact names -> (output role, stage that writes it).
ARTIFACT_STAGE = {"prompts_train": ("prompts", "prompts-train"), "prompts_heldout": ("prompts", "prompts-heldout"),
                  "generations": ("generations", "collect"), "judgments": ("judgments", "annotate"),
                  "pairs": ("pairs", "pair"), "checkpoint": ("checkpoint", "train")}
MODEL_ROLES = ("policy", "reference", "model")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportError(ValueError):
    """The report target cannot be found or read; the message names it."""


@dataclass
class ArtifactLink:
    role: str
    name: str
    sha256: str
    path: str


@dataclass
class StageRun:
    run_id: str
    stage: str
    status: str
    parent_run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    inputs: list[ArtifactLink]
    outputs: list[ArtifactLink]
    reused: bool = False  # logged by an earlier round; this round's task was a cache hit

    def output(self, role: str) -> ArtifactLink | None:
        return next((o for o in self.outputs if o.role == role), None)


@dataclass
class RoundData:
    run_id: str
    name: str
    round_index: int
    campaign: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    stages: dict[str, StageRun] = field(default_factory=dict)
    train_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    pairs: pd.DataFrame | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.tags.get("alignflow.promoted") == "true"

    @property
    def candidate_sha(self) -> str | None:
        train = self.stages.get("train")
        link = train.output("checkpoint") if train else None
        return link.sha256 if link else self.tags.get(ARTIFACT_TAG + "checkpoint")


@dataclass
class ChainEntry:
    depth: int
    role: str
    sha256: str
    name: str
    producer: StageRun | None  # None: an external input (the seed policy, a hub model)
    repeat: bool = False  # already shown higher up the chain, not expanded again


@dataclass
class FinalComparison:
    """A campaign's starting policy against its last checkpoint (flows/campaign.py: tag alignflow.campaign_final)."""

    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass
class ReportData:
    title: str
    target: str
    tracking_uri: str
    experiment: str
    rounds: list[RoundData]
    lineage: list[ChainEntry]
    registry: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    final: FinalComparison | None = None


def check_store(tracking_uri: str) -> None:
    """MLflow creates an empty SQLite store where none exists; a report of nothing would hide a wrong path."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ReportError(f"no MLflow store at {path} (tracking URI {tracking_uri})")


def _links(run, context: str) -> list[ArtifactLink]:
    out = []
    for d in (run.inputs.dataset_inputs if run.inputs else []):
        tags = {t.key: t.value for t in d.tags}
        if tags.get("mlflow.data.context") != context:
            continue
        try:
            path = json.loads(d.dataset.source).get("uri", "")
        except (ValueError, AttributeError):
            path = str(d.dataset.source)
        out.append(ArtifactLink(role=tags.get("alignflow.role", ""), name=d.dataset.name,
                                sha256=tags.get(SHA_TAG, d.dataset.digest), path=path))
    return out


def _stage(run, reused: bool = False) -> StageRun:
    t = run.data.tags
    return StageRun(run_id=run.info.run_id, stage=t.get(STAGE_TAG, run.info.run_name), status=run.info.status,
                    parent_run_id=t.get("mlflow.parentRunId", ""), params=dict(run.data.params),
                    metrics=dict(run.data.metrics), inputs=_links(run, "input"), outputs=_links(run, "output"),
                    reused=reused)


class Producers:
    """The stage run that logged an artifact as its output, found by the ``output.<role>`` tag lineage sets on every
    stage run, in any experiment of the store (the earliest such run; memoised)."""

    def __init__(self, c):
        self.c = c
        self.experiment_ids = [e.experiment_id for e in c.search_experiments()]
        self._found: dict[tuple[str, str], StageRun | None] = {}

    def __call__(self, role: str, sha: str) -> StageRun | None:
        role = "checkpoint" if role in MODEL_ROLES else role
        if (role, sha) not in self._found:
            runs = self.c.search_runs(self.experiment_ids, filter_string=f"tags.`output.{role}` = '{sha}'",
                                      order_by=["attributes.start_time ASC"], max_results=1)
            self._found[(role, sha)] = _stage(runs[0], reused=True) if runs else None
        return self._found[(role, sha)]


def _round(c, run, producers: Producers) -> RoundData:
    t = run.data.tags
    index = t.get(ROUND_INDEX_TAG, "0")
    rd = RoundData(run_id=run.info.run_id, name=run.info.run_name, round_index=int(index) if index.isdigit() else 0,
                   campaign=t.get(CAMPAIGN_TAG, ""), status=run.info.status, tags=dict(t),
                   params=dict(run.data.params), metrics=dict(run.data.metrics))
    children = c.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rd.run_id}'",
                             order_by=["attributes.start_time ASC"])
    for child in children:  # a resumed round may have logged a stage twice: the last one wins
        s = _stage(child)
        rd.stages[s.stage] = s
    for name, (role, stage) in ARTIFACT_STAGE.items():
        sha = t.get(ARTIFACT_TAG + name)
        if sha and stage not in rd.stages and (s := producers(role, sha)) is not None:
            rd.stages[stage] = s
    evaluated = any(k.startswith(("before.", "after.")) for k in rd.metrics)  # evaluate.enabled=false: none
    missing = [s for s in STAGE_ORDER if s not in rd.stages and (evaluated or not s.startswith("evaluate"))]
    if missing:
        rd.problems.append(f"no stage run recorded for {', '.join(missing)} (cached tasks log none in the round "
                           f"that reused them)")
    if "train" in rd.stages:
        from pipeline_lib.report.charts import TRAIN_CURVES

        rid = rd.stages["train"].run_id
        for key, _ in TRAIN_CURVES:
            hist = c.get_metric_history(rid, key)
            if len(hist) > 1:
                rd.train_history[key] = sorted((m.step, m.value) for m in hist)
    rd.pairs = _pairs_table(rd)
    return rd


def _pairs_table(rd: RoundData) -> pd.DataFrame | None:
    from pipeline_lib.artifacts import ArtifactError, read_table, ref_from_dir

    link = rd.stages["pair"].output("pairs") if "pair" in rd.stages else None
    if link is None:
        return None
    try:
        ref = ref_from_dir(link.path)
        if ref.sha256 != link.sha256:
            raise ArtifactError(f"its manifest names {ref.sha256[:12]}, the run recorded {link.sha256[:12]}")
        return read_table(ref, check=True)
    except (ArtifactError, OSError) as e:
        rd.problems.append(f"pairs artifact {link.path} unreadable ({e}): no score/length distributions")
        return None


def find_rounds(c, target: str) -> tuple[list, str, list[str]]:
    """Parent runs of ``target`` (a run id or campaign name), a title, and notes about runs left out."""
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(target):
        try:
            run = c.get_run(target)
        except MlflowException:
            run = None
        if run is not None:
            parent = run.data.tags.get("mlflow.parentRunId")
            run = c.get_run(parent) if parent else run
            if ROUND_KEY not in run.data.tags:
                raise ReportError(f"run {target} is not an alignflow round (no {ROUND_KEY} tag)")
            return [run], f"round {run.info.run_name}", []
    if "'" in target or "\\" in target:
        raise ReportError(f"campaign name {target!r}: quotes and backslashes cannot be searched for")
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`{CAMPAIGN_TAG}` = '{target}'",
                         order_by=["attributes.start_time ASC"], max_results=5000) if exps else []
    runs = [r for r in runs if ROUND_KEY in r.data.tags]
    if not runs:
        rounds = c.search_runs(exps, filter_string=f"tags.`{ROUND_KEY}` != ''", max_results=5000) if exps else []
        known = sorted({r.data.tags.get(CAMPAIGN_TAG, "") for r in rounds} - {""})
        raise ReportError(f"no campaign named {target!r} and no run with that id in the MLflow store "
                          f"(campaigns there: {', '.join(known) or 'none'})")
    by_index: dict[int, Any] = {}
    for r in runs:  # a campaign run again under the same name: the latest parent run per round index
        index = r.data.tags.get(ROUND_INDEX_TAG, "0")
        by_index[int(index) if index.isdigit() else 0] = r
    notes = []
    if len(by_index) < len(runs):
        notes.append(f"{len(runs) - len(by_index)} earlier parent run(s) of the same round indices left out "
                     "(the latest run of each round is shown)")
    return [by_index[k] for k in sorted(by_index)], f"campaign {target}", notes


def lineage_chain(candidate_sha: str | None, producers: Producers) -> list[ChainEntry]:
    """Walk back from the candidate checkpoint through the stage runs that produced each input (by sha256), across
    rounds (a round's policy is an earlier round's checkpoint). Depth-first; an artifact met twice (the policy that
    sampled the data and is also the reference) is listed again but not expanded."""
    chain: list[ChainEntry] = []
    seen: set[str] = set()

    def visit(role: str, sha: str, name: str, depth: int) -> None:
        s, repeat = producers(role, sha), sha in seen
        chain.append(ChainEntry(depth, role, sha, name, s, repeat=repeat))
        seen.add(sha)
        if repeat or s is None:
            return
        for i in s.inputs:
            visit(i.role, i.sha256, i.name, depth + 1)

    if candidate_sha:
        visit("checkpoint", candidate_sha, "candidate", 0)
    return chain


def registry_versions(c, name: str) -> list[dict[str, Any]]:
    """The registered model's versions with their aliases (``champion``, ``candidate``)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name = '{name}'")
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    return [{"version": str(v.version), "aliases": ", ".join(sorted(by_version.get(str(v.version), []))),
             "run_id": v.run_id or "", "sha256": (v.tags or {}).get(SHA_TAG, ""),
             "seed": (v.tags or {}).get("alignflow.seed") == "true"}
            for v in sorted(versions, key=lambda v: int(v.version))]


def collect_report(target: str, tracking_uri: str) -> ReportData:
    """Everything the report page shows for ``target``."""
    from pipeline_lib.lineage import client

    check_store(tracking_uri)
    c = client(tracking_uri)
    parents, title, notes = find_rounds(c, target)
    producers = Producers(c)
    rounds = [_round(c, p, producers) for p in parents]
    for rd in rounds:
        notes += [f"{rd.name}: {p}" for p in rd.problems]
    registered = rounds[-1].params.get("run.registered_model", "")
    return ReportData(title=title, target=target, tracking_uri=tracking_uri,
                      experiment=c.get_experiment(parents[0].info.experiment_id).name, rounds=rounds,
                      lineage=lineage_chain(rounds[-1].candidate_sha, producers),
                      registry=registry_versions(c, registered) if registered else [], notes=notes,
                      final=final_comparison(c, target))


def final_comparison(c, campaign: str) -> FinalComparison | None:
    """The latest start-vs-last comparison run of ``campaign`` (None for a single round or an older campaign)."""
    if "'" in campaign or "\\" in campaign:
        return None
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`{FINAL_TAG}` = '{campaign}'",
                         order_by=["attributes.start_time DESC"], max_results=1) if exps else []
    if not runs:
        return None
    return FinalComparison(run_id=runs[0].info.run_id, metrics=dict(runs[0].data.metrics), tags=dict(runs[0].data.tags))
