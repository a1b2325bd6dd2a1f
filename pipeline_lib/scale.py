"""Sharded stages: split a stage's input table into N shards, run the stage on each, merge the shards' outputs.

The stage functions themselves are unchanged: a shard is an ordinary table artifact (a slice of the input) and the
stage runs on it as on any input. What this module adds:
- ``split_table``: N shard artifacts of a table, whole groups each (all K samples of a prompt stay together: a
  pairwise judge and SPPO's win-probabilities compare the samples of one prompt with each other), balanced by rows;
  every row keeps its position in the input (``_shard_row``) so the merge restores the input's order exactly.
- ``shard_seed``: the sampling seed of shard i of N. One seed in every shard would hand every engine the same
  random stream, so prompts at the same position of different shards would draw the same noise; the seed is
  derived from (seed, i, N), so a re-run of a shard reproduces it and N = 1 keeps the configured seed.
- ``merge_*``: the stage's output over all shards, with the input's row order, global ``prompt_index`` and the
  stage's metrics recomputed over all rows (per-engine rates as sums over the shards' engines).

With ``scale.shards: 1`` (the default) none of this runs: the round calls the stages as before (same task cache keys,
same artifacts). With N > 1 the merged artifact's key includes N: N shards sample with other seeds than one engine,
so their result is a different artifact, never mistaken for the unsharded one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, ref_from_dir, sha256_json, write_table
from pipeline_lib.stage import done, output_dir

ROW = "_shard_row"  # a row's position in the split input; dropped by the merge


class ScaleConfig(BaseModel):
    """``scale:`` how a round's sharded stages (collect, model judges in annotate, held-out generation) run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    shards: int = Field(1, ge=1, description="split collect / model-judge annotate / held-out generation into N "
                                             "shards (1: unsharded, exactly as without this section)")
    task_runner: Literal["sequential", "ray", "dask"] = Field(
        "sequential", description="what runs the shards: sequential (one after another, in the flow's process), "
                                  "ray (prefect-ray's RayTaskRunner), dask (prefect-dask's DaskTaskRunner)")
    address: str | None = Field(None, description="ray: the cluster's address ('auto', 'HOST:6379', "
                                                  "'ray://HOST:10001'); dask: the scheduler ('tcp://HOST:8786'); "
                                                  "unset: a temporary local cluster for the stage")
    resources: dict[str, float] = Field(default_factory=dict, description="per shard, e.g. {num_gpus: 1, "
                                                                          "num_cpus: 8} (ray), {GPU: 1} (dask)")
    min_rows_per_shard: int = Field(1, ge=1, description="a stage gets at most rows / this many shards (prompts for "
                                                         "collect and evaluation, samples for annotate); one shard: "
                                                         "the unsharded task. E.g. 256: a 100-prompt held-out "
                                                         "evaluation stays on one engine instead of loading 32")

    def shards_for(self, rows: int | None) -> int:
        """How many shards a stage input of ``rows`` rows gets (1: run the stage unsharded)."""
        if rows is None:
            return self.shards
        return max(1, min(self.shards, rows // self.min_rows_per_shard))

    @model_validator(mode="after")
    def _runner_needs_shards(self) -> "ScaleConfig":
        if self.task_runner != "sequential" and self.shards == 1:
            raise ValueError(f"scale.task_runner={self.task_runner} runs shards: set scale.shards > 1 "
                             "(e.g. the number of GPUs)")
        if self.resources and self.task_runner == "sequential":
            raise ValueError("scale.resources are per-shard requests to a cluster: set scale.task_runner "
                             "(ray or dask)")
        return self


def shard_seed(seed: int, index: int, n: int) -> int:
    """The seed of shard ``index`` of ``n``: ``seed`` itself when n = 1, else a 31-bit hash of (seed, index, n)."""
    if n == 1:
        return seed
    return int(sha256_json(["shard-seed", seed, index, n])[:8], 16) & 0x7FFFFFFF


def shard_bounds(group_sizes: list[int], n: int) -> list[tuple[int, int]]:
    """Split consecutive groups into at most ``n`` runs of whole groups with row counts as equal as possible:
    a run ends at the first group boundary at or past its share of the rows (``(k + 1) * total / n``)."""
    total = sum(group_sizes)
    n = max(1, min(n, len(group_sizes)))
    ends = np.cumsum(group_sizes)
    bounds, start = [], 0
    for k in range(n):
        if k == n - 1:
            stop = len(group_sizes)
        else:  # leave at least one group to each of the remaining shards
            target = (k + 1) * total / n
            stop = int(np.searchsorted(ends, target, side="left")) + 1
            stop = min(max(stop, start + 1), len(group_sizes) - (n - 1 - k))
        bounds.append((start, stop))
        start = stop
    return bounds


def split_table(source: ArtifactRef, n: int, work_dir: str | Path, group: str | None = None) -> list[ArtifactRef]:
    """``source`` as at most ``n`` shard artifacts (fewer when it has fewer groups), each a run of whole groups
    (rows with equal ``group`` column; None: every row is its own group) in first-appearance order, each row with
    its position ``_shard_row`` in ``source``."""
    df = read_table(source).reset_index(drop=True)
    df[ROW] = np.arange(len(df))
    keys = df[group] if group else df[ROW]
    order = list(dict.fromkeys(keys))  # groups in first-appearance order
    members = df.groupby(keys, sort=False).indices
    sizes = [len(members[g]) for g in order]
    bounds = shard_bounds(sizes, n)
    refs = []
    for i, (a, b) in enumerate(bounds):
        rows = np.concatenate([members[g] for g in order[a:b]])
        config = {"index": i, "of": len(bounds), "requested": n, "group": group}
        out = output_dir(work_dir, "shard", {"source": source.sha256}, config)
        refs.append(write_table(df.iloc[rows].reset_index(drop=True), out, name=f"{source.name}-shard",
                                producer="shard", inputs={"source": source.sha256}, config=config,
                                extra={"metrics": {"rows": len(rows), "groups": b - a}}))
    return refs


def _concat(shards: list[ArtifactRef]) -> tuple[pd.DataFrame, list[dict]]:
    frames = [read_table(s) for s in shards]
    manifests = [read_manifest(s.path) for s in shards]
    df = pd.concat(frames, ignore_index=True)
    return df, manifests


def _restore_order(df: pd.DataFrame, then: tuple[str, ...] = (), renumber: bool = False) -> pd.DataFrame:
    """Rows in the input's order (``_shard_row``, then ``then`` within a row's samples). ``renumber``: the shards
    were slices of a prompt table, so each numbered its prompts from 0; ``prompt_index`` becomes the position in the
    whole table."""
    df = df.sort_values([ROW, *then], kind="stable").reset_index(drop=True)
    if renumber:
        df["prompt_index"] = pd.factorize(df[ROW])[0]
    return df.drop(columns=[ROW])


def _shard_list(shards: list[ArtifactRef], manifests: list[dict]) -> list[dict[str, Any]]:
    return [{"sha256": s.sha256, "path": s.path, "rows": s.rows, "seed": (m.get("config") or {}).get("seed")}
            for s, m in zip(shards, manifests)]


def merge_generations(shards: list[ArtifactRef], policy_sha: str, prompts: ArtifactRef, config: dict[str, Any],
                      work_dir: str | Path) -> ArtifactRef:
    """The collect stage's output over all shards: rows in prompt order (samples in sample order), the collect
    metrics over all rows; ``config`` is the unsharded collect config plus ``shards``."""
    inputs = {"policy": policy_sha, "prompts": prompts.sha256}
    out = output_dir(work_dir, "collect", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df, manifests = _concat(shards)
    df = _restore_order(df, then=("sample_index",), renumber=True)
    m = [mf["metrics"] for mf in manifests]
    tokens, gen_s = sum(x["generated_tokens"] for x in m), sum(x["generate_s"] for x in m)
    metrics = {
        "n_prompts": int(df["prompt_index"].nunique()) if len(df) else 0,
        "n_samples": len(df),
        "generated_tokens": tokens,
        "generate_s": gen_s,  # engine-seconds: summed over the shards' engines
        "engine_load_s": sum(x["engine_load_s"] for x in m),
        "tokens_per_s": tokens / max(gen_s, 1e-9),  # per engine, comparable with an unsharded collect
        "mean_response_tokens": float(df["n_tokens"].mean()),
        "truncated_share": float((df["finish_reason"] == "length").mean()),
        "shards": len(shards),
    }
    return write_table(df, out, name="generations", producer="collect", inputs=inputs, config=config,
                       extra={"metrics": metrics, "policy": manifests[0].get("policy"),
                              "shards": _shard_list(shards, manifests)})


def merge_judgments(shards: list[ArtifactRef], generations: ArtifactRef, work_dir: str | Path) -> ArtifactRef:
    """The annotate stage's output over all shards (each judged whole prompts, so win-probabilities are as in one
    call); the judge identity from the shards, which must agree."""
    df, manifests = _concat(shards)
    identities = {sha256_json(mf["judge"]) for mf in manifests}
    if len(identities) != 1:
        raise ValueError(f"annotate shards of {generations.path} were judged by {len(identities)} different judges")
    identity = manifests[0]["judge"]
    config = {**identity, "shards": len(shards)}
    inputs = {"generations": generations.sha256}
    out = output_dir(work_dir, "annotate", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df = _restore_order(df)
    scores = df["score"].to_numpy(dtype=float)
    metrics = {"n_judged": len(df), "mean_score": float(scores.mean()) if len(df) else float("nan"),
               "std_score": float(scores.std()) if len(df) else float("nan"), "shards": len(shards)}
    return write_table(df, out, name="judgments", producer="annotate", inputs=inputs, config=config,
                       extra={"metrics": metrics, "judge": identity, "shards": _shard_list(shards, manifests)})


def merge_responses(shards: list[ArtifactRef], model_sha: str, prompts: ArtifactRef, config: dict[str, Any],
                    work_dir: str | Path) -> ArtifactRef:
    """Held-out responses over all shards, in the prompts' order, with the generation stats summed."""
    inputs = {"model": model_sha, "prompts": prompts.sha256}
    out = output_dir(work_dir, "heldout-responses", inputs, config)
    if done(out):
        return ref_from_dir(out)
    df, manifests = _concat(shards)
    df = _restore_order(df, renumber=True)
    stats = {k: sum(mf["metrics"][k] for mf in manifests) for k in ("generated_tokens", "generate_s", "load_s")}
    return write_table(df, out, name="responses", producer="heldout-generate", inputs=inputs, config=config,
                       extra={"metrics": {**stats, "shards": len(shards)}, "shards": _shard_list(shards, manifests)})
