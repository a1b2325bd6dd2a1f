"""The stage tasks a flow calls, bound to one work dir: ``StageTasks.in_work_dir(work_dir)``.

A task's results (artifact references) are kept, checked and locked in ``<work_dir>/prefect-results``
(``tasks.results.with_result_store``), and the work dir is known only when a flow runs, so a flow binds the tasks
first and calls them by name: ``t.collect(...)`` is ``tasks.stages.collect_task``, which calls
``pipeline_lib.stages.collect.run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import Task

from tasks import evaluate as benchmark_tasks
from tasks import stages as stage_tasks
from tasks.results import with_result_store

# field of StageTasks -> the task it binds
UNBOUND: dict[str, Task] = {
    "prompts": stage_tasks.prompts_task,
    "collect": stage_tasks.collect_task,
    "annotate": stage_tasks.annotate_task,
    "pair": stage_tasks.pair_task,
    "train": stage_tasks.train_task,
    "evaluate": stage_tasks.evaluate_task,
    "dataset_pairs": stage_tasks.dataset_pairs_task,
    "hybrid_prompts": stage_tasks.hybrid_prompts_task,
    "hybrid_candidates": stage_tasks.hybrid_candidates_task,
    "hybrid_pair": stage_tasks.hybrid_pair_task,
    "benchmark_data": benchmark_tasks.benchmark_data_task,
    "benchmark_generate": benchmark_tasks.generate_task,
    "alpaca_annotate": benchmark_tasks.alpaca_annotate_task,
    "mt_bench_judge": benchmark_tasks.mt_bench_judge_task,
    "ifeval": benchmark_tasks.ifeval_task,
}


@dataclass(frozen=True)
class StageTasks:
    """Every stage task, bound to one work dir's result store (see the module docstring and ``UNBOUND``)."""

    prompts: Task
    collect: Task
    annotate: Task
    pair: Task
    train: Task
    evaluate: Task
    dataset_pairs: Task
    hybrid_prompts: Task
    hybrid_candidates: Task
    hybrid_pair: Task
    benchmark_data: Task
    benchmark_generate: Task
    alpaca_annotate: Task
    mt_bench_judge: Task
    ifeval: Task

    @classmethod
    def in_work_dir(cls, work_dir: str | Path, relog: bool = False) -> "StageTasks":
        """``relog``: ignore the stored results, so every stage runs, finds its artifact and logs its MLflow run
        (a new MLflow store or experiment; see ``with_result_store``)."""
        return cls(**dict(zip(UNBOUND, with_result_store(work_dir, *UNBOUND.values(), relog=relog))))
