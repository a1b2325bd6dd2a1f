"""``alignflow run|campaign --dry-run``: what a round would do, computed without running or loading anything.

The stages follow ``flows/round.py``'s recipe; for each, the task's Prefect cache key is computed with the same
function the run uses (``tasks.common.cache_key``: the task's name, the code version, the inputs' content hashes
and the stage config). A key with a result record in ``<work_dir>/prefect-results`` is a cache hit, and its result
(the artifact reference) gives the next stage's input hash; after the first stage that runs, the rest run too.
A test runs the smoke round and checks that the plan then predicts a cache hit for every stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline_lib.config import RoundConfig
from pipeline_lib.models import ResolvedModel, locate
from tasks.common import cache_key, results_dir
from tasks.stages import (annotate_task, collect_task, dataset_pairs_task, evaluate_task, hybrid_candidates_task,
                          hybrid_pair_task, hybrid_prompts_task, pair_task, prompts_task, train_task)

UNKNOWN = None  # an input whose content is not known before the run (an upstream stage must run first)


class _Planner:
    def __init__(self, work_dir: str):
        from prefect.results import ResultStore

        from tasks.results import ArtifactJSON, WorkDirResults

        # the run's own record storage: the same checks (JSON only, artifact present and verified) decide a hit, so
        # the plan never unpickles a record and never predicts a hit the run would refuse
        base = str(results_dir(Path(work_dir).resolve()).resolve())
        self.store = ResultStore(result_storage=WorkDirResults(basepath=base), serializer=ArtifactJSON())
        self.steps: list[tuple[str, str]] = []

    def step(self, task, label: str, **params: Any):
        """(label, "cached" | "runs"); returns the cached result or UNKNOWN."""
        if any(v is UNKNOWN for k, v in params.items() if k != "ctx"):
            self.steps.append((label, "runs"))
            return UNKNOWN
        key = cache_key(SimpleNamespace(task=task), params)
        result = UNKNOWN
        if self.store.exists(key):
            try:
                result = self.store.read(key).result
            except Exception:  # noqa: BLE001 - an unreadable record is a miss, as it is for the run
                result = UNKNOWN
        self.steps.append((label, "runs" if result is UNKNOWN else "cached"))
        return result


def _model(ref: str | None) -> ResolvedModel | None:
    return locate(ref)[0] if ref else None


def _champion(config: RoundConfig, policy: ResolvedModel | None) -> tuple[ResolvedModel | None, str]:
    """The model the candidate is compared with: the registry's champion, or (first round) the policy."""
    from pipeline_lib.lineage import RoundLineage

    uri = config.run.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return policy, "none registered yet (no MLflow store): the policy becomes the champion"  # and none created
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mv = RoundLineage(config.run.mlflow_tracking_uri, config.run.experiment).alias_version(
        config.run.registered_model, "champion")
    if mv is None:
        return policy, "none registered yet: the policy becomes the champion"
    if policy is not None and (mv.tags or {}).get("alignflow.sha256") == policy.sha256:
        return policy, f"v{mv.version} (the policy)"
    return _model(f"models:/{config.run.registered_model}/{mv.version}"), f"v{mv.version}"


def plan_round(config: RoundConfig, policy_ref: str | None = None) -> dict[str, Any]:
    """The round's stages with their expected cache state, the models, and where everything goes."""
    p = _Planner(config.run.work_dir)
    ref = policy_ref or config.policy
    if config.follow_champion and policy_ref is None:
        try:
            _, note = _champion(config, None)
            if not note.startswith("none"):  # follow_champion: the registry's champion is the policy
                ref = f"models:/{config.run.registered_model}@champion"
        except Exception:  # noqa: BLE001 - no registry yet
            pass
    policy = _model(ref)
    pr = config.prompts
    heldout = p.step(prompts_task, "prompts-heldout", cfg=pr, split="heldout", n=pr.n_heldout, ctx=None)
    mode = config.data.mode
    if mode == "on_policy":
        train_prompts = p.step(prompts_task, "prompts-train", cfg=pr, split="train", n=pr.n_train, ctx=None)
        gens = p.step(collect_task, "collect", policy=policy, prompts=train_prompts, cfg=config.collect, ctx=None)
        judged = p.step(annotate_task, "annotate", generations=gens, judge=config.judge, ctx=None)
        pairs = p.step(pair_task, "pair", judgments=judged, cfg=config.pairs, ctx=None)
    elif mode == "off_policy":
        pairs = p.step(dataset_pairs_task, "dataset-pairs", cfg=config.data.preference_data, policy=policy, ctx=None)
    else:
        dataset = p.step(dataset_pairs_task, "dataset-pairs", cfg=config.data.preference_data, policy=policy,
                         ctx=None)
        train_prompts = p.step(hybrid_prompts_task, "hybrid-prompts", dataset_pairs=dataset, ctx=None)
        gens = p.step(collect_task, "collect", policy=policy, prompts=train_prompts, cfg=config.collect, ctx=None)
        cands = p.step(hybrid_candidates_task, "hybrid-candidates", dataset_pairs=dataset, generations=gens,
                       ctx=None)
        judged = p.step(annotate_task, "annotate", generations=cands, judge=config.judge, ctx=None)
        pairs = p.step(hybrid_pair_task, "hybrid-pair", judgments=judged, cfg=config.data.hybrid, ctx=None)
    reference = policy
    if config.train.reference == "initial" and config.initial_policy:
        reference = _model(config.initial_policy)
    ckpt = p.step(train_task, "train", policy=policy, pairs=pairs, cfg=config.train, method=config.method(),
                  reference=reference, ctx=None)
    champion, champion_note = _champion(config, policy)
    if config.evaluate.enabled:
        tp = config.collect.tensor_parallel_size
        candidate = UNKNOWN if ckpt is UNKNOWN else ResolvedModel(ref=f"checkpoint:{ckpt.short}", path=ckpt.path,
                                                                    sha256=ckpt.sha256)
        for role, model in (("champion", champion), ("candidate", candidate)):
            p.step(evaluate_task, f"evaluate-{role}", model=model, prompts=heldout, judge=config.judge,
                   cfg=config.evaluate, ctx=None, role=role, tensor_parallel_size=tp)
    return {"policy": ref, "stages": p.steps, "champion": champion_note,
            "checkpoint": None if ckpt is UNKNOWN else ckpt.path}


def describe_models(config: RoundConfig) -> list[tuple[str, str, str]]:
    """(role, reference, where it resolves or what happens first) for every model the round loads."""
    refs = [("policy", config.policy)]
    if config.train.reference == "initial" and config.initial_policy:
        refs.append(("reference", config.initial_policy))
    judge_model = getattr(config.judge, "model", None)  # the judges that load a model have this option
    if judge_model:
        refs.append(("judge", str(judge_model)))
    out = []
    for role, ref in refs:
        if ref.startswith("models:/"):
            try:
                m, note = locate(ref)
            except Exception as e:  # noqa: BLE001 - the registry may not know it before the first round
                m, note = None, f"not resolvable yet: {e}"
        else:
            m, note = locate(ref)
        out.append((role, ref, f"{note} (sha256 {m.short})" if m else note))
    if not judge_model:
        out.append(("judge", config.judge.kind, "no model to load"))
    return out


def format_plan(title: str, config: RoundConfig, plan: dict[str, Any], models: list[tuple[str, str, str]],
                data_note: str, log_name: str = "") -> str:
    runs = sum(s == "runs" for _, s in plan["stages"])
    lines = [title]
    lines += [f"  {role:<10} {ref} -> {note}" for role, ref, note in models]
    lines.append(f"  {'data':<10} {data_note}")
    lines.append(f"  {'stages':<10} " + ", ".join(f"{n} ({s})" for n, s in plan["stages"])
                 + f": {runs} to run, {len(plan['stages']) - runs} cache hit(s)")
    lines.append(f"  {'champion':<10} {plan['champion']}")
    wd = Path(config.run.work_dir)
    lines.append(f"  {'artifacts':<10} {wd / 'artifacts'}/<stage>/<key>/ (Prefect results: {results_dir(wd)})")
    lines.append(f"  {'MLflow':<10} {config.run.mlflow_tracking_uri}, experiment {config.run.experiment!r}, "
                 f"registered model {config.run.registered_model!r}")
    lines.append(f"  {'log':<10} {wd / 'logs'}/<time>-{log_name or config.name}.log")
    return "\n".join(lines)
