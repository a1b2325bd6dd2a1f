"""One alignment round, top to bottom: prompts -> collect -> annotate -> pair -> train -> evaluate.

Run it with ``alignflow run --config configs/default.yaml`` (ephemeral Prefect, SQLite MLflow), or as a Prefect
deployment. Every stage is a cached, retryable task (``t.<stage>``: ``tasks/stages.py``, which calls
``pipeline_lib.stages.<stage>.run``); the round's MLflow parent run holds one child run per stage. What the round
records around the stages (parent run, champion, registration, promotion, summary, charts) is in
``flows/round_record.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows.round_record import (champion_of, checkpoint_model, finish_round_run, open_lineage, policy_reference,
                                publish_round, register_and_promote, report_metrics, round_summary, start_round_run)
from flows.sharded import ShardedStages
from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table
from pipeline_lib.config import RoundConfig
from pipeline_lib.methods import PAIRINGS
from pipeline_lib.models import ResolvedModel
from tasks.bound import StageTasks
from tasks.common import RoundContext
from tasks.stages import resolve_model_task


@flow(name="alignment-round", log_prints=True)
def alignment_round(config: RoundConfig, campaign: str = "", round_index: int = 0) -> dict:
    """Run one preference-alignment round and return its summary (metrics before/after, artifact hashes)."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    work_dir = str(Path(config.run.work_dir).resolve())
    lineage = open_lineage(config, work_dir, logger)
    t = StageTasks.in_work_dir(work_dir, relog=lineage.new_experiment)  # results checked and kept in the work dir

    # The policy that samples this round, and the round's MLflow parent run (found again by its content).
    policy: ResolvedModel = resolve_model_task(policy_reference(config, lineage))
    round_key, parent = start_round_run(lineage, config, policy, campaign, round_index)
    ctx = RoundContext.of_run(config.run, work_dir, parent)
    sharded = ShardedStages(config.scale, ctx, t.collect, t.annotate, t.evaluate)  # scale.shards > 1: in shards

    # Held-out prompts: the same every round, so every candidate is compared with its champion on them.
    heldout = t.prompts(config.prompts, "heldout", config.prompts.n_heldout, ctx)
    # Preference pairs, by data mode (docs/data_sources.md).
    if config.data.mode == "on_policy":  # the policy's K samples per prompt, judged, paired
        train_prompts = t.prompts(config.prompts, "train", config.prompts.n_train, ctx)
        generations = sharded.collect(policy, train_prompts, config.collect)
        data = {"prompts_train": train_prompts, "generations": generations}
        judgments = generations  # a pairing that reads no verdicts (SAIL-PP's self-labels) skips the judge
        if PAIRINGS[config.pairs.strategy].needs_judge:
            judgments = data["judgments"] = sharded.annotate(generations, config.judge)
        pairs = t.pair(judgments, config.pairs, ctx)
    elif config.data.mode == "off_policy":  # a fixed preference dataset, no collection (off-policy DPO / WPO)
        pairs = t.dataset_pairs(config.data.preference_data, policy, ctx)
        data = {}
    else:  # hybrid (WPO HB): the dataset's responses and K on-policy samples, judged together
        dataset = t.dataset_pairs(config.data.preference_data, policy, ctx)
        train_prompts = t.hybrid_prompts(dataset, ctx)
        generations = sharded.collect(policy, train_prompts, config.collect)
        candidates = t.hybrid_candidates(dataset, generations, ctx)
        judgments = sharded.annotate(candidates, config.judge)
        pairs = t.hybrid_pair(judgments, config.data.hybrid, ctx)
        data = {"dataset_pairs": dataset, "prompts_train": train_prompts, "generations": generations,
                "candidates": candidates, "judgments": judgments}

    # Train. BPO: the reference is the behavior policy that sampled these pairs (this round's policy); otherwise
    # the campaign's initial policy stays the fixed reference.
    reference = policy
    if config.train.reference == "initial" and config.initial_policy:
        reference = resolve_model_task(config.initial_policy)
    checkpoint = t.train(policy, pairs, config.train, config.method(), reference, ctx)
    candidate = checkpoint_model(checkpoint)

    # Evaluate the candidate against the champion (the registry's, or in the first round the starting policy).
    champion, champion_version = champion_of(lineage, config, policy, parent)
    before = after = {k: float("nan") for k in report_metrics(config)}
    paired: dict[str, dict] = {}
    if config.evaluate.enabled:
        before, after, paired = evaluate_both(config, champion, candidate, heldout, sharded, t)

    # Register the candidate; promote it when it beats the champion (promotion.rule).
    version, promoted, reason = register_and_promote(lineage, config, parent, checkpoint, round_key, policy,
                                                     champion_version, before, after, paired)

    # Record and publish: the summary, the parent run's metrics and tags, charts, Prefect artifacts.
    artifacts = {**data, "prompts_heldout": heldout, "pairs": pairs, "checkpoint": checkpoint}
    summary = round_summary(config, round_key, parent, version, champion_version, promoted, reason, before, after,
                            paired, artifacts, checkpoint, pairs, time.perf_counter() - t_start)
    finish_round_run(lineage, parent, summary)
    publish_round(lineage, config, parent, summary, pairs, checkpoint, campaign, logger)
    logger.info("round %s done: candidate v%s, %s", config.name, version, reason)
    return summary


def evaluate_both(config: RoundConfig, champion: ResolvedModel, candidate: ResolvedModel, heldout: ArtifactRef,
                  sharded: ShardedStages, t: StageTasks,
                  roles: tuple[str, str] = ("champion", "candidate")) -> tuple[dict, dict, dict]:
    """Champion and candidate on the same held-out prompts (and IFEval's when enabled): (champion metrics,
    candidate metrics, paired comparisons by metric name), on as many GPUs as the policy needs to sample
    (collect.tensor_parallel_size)."""
    from pipeline_lib.evaluation.ifeval import paired_ifeval
    from pipeline_lib.stages.evaluate import paired_heldout

    ev, tp = config.evaluate, config.collect.tensor_parallel_size
    stats = {"n_resamples": ev.n_resamples, "confidence": ev.confidence}
    ctx = sharded.ctx
    before = sharded.evaluate(champion, heldout, config.judge, ev, roles[0], tp)
    after = sharded.evaluate(candidate, heldout, config.judge, ev, roles[1], tp)
    m_before, m_after = read_manifest(before.path)["metrics"], read_manifest(after.path)["metrics"]
    paired = paired_heldout(read_table(before), read_table(after), **stats)
    if ev.ifeval.enabled:
        data = t.benchmark_data(None, None, "", ctx, ev.ifeval)["ifeval"]
        ib = t.ifeval(champion, data, ev.ifeval, ctx, role=roles[0], tensor_parallel_size=tp)
        ia = t.ifeval(candidate, data, ev.ifeval, ctx, role=roles[1], tensor_parallel_size=tp)
        for m, ref in ((m_before, ib), (m_after, ia)):
            m.update({f"ifeval.{k}": v for k, v in read_manifest(ref.path)["metrics"].items()})
        paired.update({f"ifeval.{k}": v for k, v in paired_ifeval(read_table(ib), read_table(ia), **stats).items()})
    return m_before, m_after, paired
