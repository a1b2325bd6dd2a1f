"""Prefect tasks of the benchmark evaluation (AlpacaEval 2, MT-Bench, IFEval): call the stage functions of
:mod:`pipeline_lib.evaluation.benchmarks`, record each stage as a child MLflow run, return artifact references.

The evaluation data (eval set, questions) is an artifact of its own and is logged as an input dataset of the stages
that read it, with its sha256 digest. Judges are recorded by ``judge.identity()`` (never an address or a key).
"""

from __future__ import annotations

from prefect import task

from pipeline_lib.artifacts import ArtifactRef, read_manifest
from pipeline_lib.evaluation import bench_config as bc
from pipeline_lib.evaluation import benchmarks as bm
from pipeline_lib.evaluation import ifeval as ife
from pipeline_lib.judges.base import JudgeOptions
from pipeline_lib.models import ResolvedModel
from tasks.common import RoundContext, gpu_slot, task_options


@task(**task_options("benchmark-data"))
def benchmark_data_task(a: bc.AlpacaEvalConfig | None, m: bc.MTBenchConfig | None, data_fingerprint: str,
                        ctx: RoundContext, i: ife.IFEvalOptions | None = None) -> dict[str, ArtifactRef]:
    """The evaluation data of the benchmarks given (None: skipped) as artifacts (``data_fingerprint``: the local
    files' hashes, part of the cache key)."""
    out = {}
    if a is not None:
        out["alpaca_eval"] = bm.load_alpaca_set(a.eval_set, a.subset, a.subset_seed, ctx.work_dir)
    if m is not None:
        out["mt_bench"] = bm.load_mt_bench_set(m.questions, m.n_questions, ctx.work_dir, m.question_ids,
                                               m.subset_seed)
    if i is not None:
        out["ifeval"] = ife.load_ifeval_set(i, ctx.work_dir)
    return out


@task(**task_options("benchmark-generate"))
def generate_task(model: ResolvedModel, data: dict[str, ArtifactRef], a: bc.AlpacaEvalConfig, m: bc.MTBenchConfig,
                  ctx: RoundContext, tensor_parallel_size: int = 1) -> dict[str, ArtifactRef]:
    """The model's AlpacaEval outputs and MT-Bench answers (for the benchmarks in ``data``); AlpacaEval and MT-Bench
    turn 1 share worker calls. One child run per benchmark."""
    with gpu_slot(ctx.gpu_limit):
        refs = bm.generate_benchmarks(
            model, ctx.work_dir,
            alpaca=(data["alpaca_eval"], a.generation) if "alpaca_eval" in data else None,
            mt_bench=(data["mt_bench"], m.max_tokens, m.seed, m.kv_cache_gib) if "mt_bench" in data else None,
            quiet=ctx.quiet, tensor_parallel_size=tensor_parallel_size)
    for bench, ref in refs.items():
        man = read_manifest(ref.path)
        ctx.record(f"{bench}-generate", {"model": model, "eval_data": data[bench]}, {"outputs": ref},
                   {"model": model.ref, "generation": man["generation"]})
    return refs


@task(**task_options("alpaca-annotate"))
def alpaca_annotate_task(outputs: ArtifactRef, eval_set: ArtifactRef, judge: JudgeOptions,
                         cfg: bc.AlpacaEvalConfig, ctx: RoundContext) -> ArtifactRef:
    """Pairwise verdicts against the reference outputs; AlpacaEval 2 metrics in the manifest."""
    ref = bm.alpaca_annotate(outputs, judge, ctx.work_dir, cfg.instruction_difficulty, quiet=ctx.quiet)
    man = read_manifest(ref.path)
    ctx.record("alpaca_eval-annotate", {"outputs": outputs, "eval_data": eval_set}, {"annotations": ref},
               {"judge": man["judge"], "instruction_difficulty": man["instruction_difficulty"]})
    return ref


@task(**task_options("mt-bench-judge"))
def mt_bench_judge_task(answers: ArtifactRef, questions: ArtifactRef, judge: JudgeOptions,
                        cfg: bc.MTBenchConfig, ctx: RoundContext) -> ArtifactRef:
    """Single-answer ratings per turn; scores per turn / category / overall; the category chart as an MLflow
    artifact of the stage's run."""
    from pipeline_lib.lineage import RoundLineage

    ref = bm.mt_bench_judge(answers, judge, cfg.reference_answers, cfg.judge_prompts, ctx.work_dir,
                            quiet=ctx.quiet)
    man = read_manifest(ref.path)
    run_id = ctx.record("mt_bench-judge", {"answers": answers, "eval_data": questions}, {"ratings": ref},
                        {"judge": man["judge"], "reference_answers": man["reference_answers"]})
    RoundLineage(ctx.tracking_uri, ctx.experiment).client.log_artifact(run_id, man["chart"]["path"], "charts")
    return ref


@task(**task_options("ifeval"))
def ifeval_task(model: ResolvedModel, data: ArtifactRef, opts: ife.IFEvalOptions, ctx: RoundContext,
                role: str = "model", tensor_parallel_size: int = 1) -> ArtifactRef:
    """Greedy IFEval responses of ``model``, scored (the four IFEval accuracies and the truncated share in the
    manifest); ``role`` names the child run (champion / candidate in a round)."""
    with gpu_slot(ctx.gpu_limit):
        ref = ife.evaluate_ifeval(model, data, opts, ctx.work_dir, quiet=ctx.quiet,
                                  tensor_parallel_size=tensor_parallel_size)
    ctx.record(f"ifeval-{role}", {"model": model, "eval_data": data}, {"evaluation": ref},
               {"model": model.ref, **read_manifest(ref.path)["config"]})
    return ref
