"""Small flows over the real result store (tasks.results) for tests/integration/test_result_store.py.

``prompts_flow`` runs the real prompts stage (no model needed). ``probe_flow`` runs a stage-like task that can be
held until a file appears, so that two processes can be made to want the same result at the same time; run it as
``python -m tests.integration._result_flow WORK_DIR TRACKING_URI HOLD_FILE`` (prints the outcome as JSON).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
from prefect import flow, task

from pipeline_lib.artifacts import ArtifactRef, write_table
from pipeline_lib.lineage import RoundLineage
from pipeline_lib.prompts.sources import BuiltinPrompts
from pipeline_lib.stage import output_dir
from tasks.common import RoundContext, task_options
from tasks.results import with_result_store
from tasks.stages import prompts_task


def _ctx(work_dir: str, tracking_uri: str, key: str) -> RoundContext:
    lin = RoundLineage(tracking_uri, "result-store")
    parent = lin.start_round(key, key, {}, {})
    return RoundContext(work_dir=work_dir, tracking_uri=tracking_uri, experiment="result-store",
                        parent_run_id=parent, quiet=True)


@flow(name="result-store-prompts")
def prompts_flow(work_dir: str, tracking_uri: str, n: int = 4) -> dict:
    (prompts_t,) = with_result_store(work_dir, prompts_task)
    state = prompts_t(BuiltinPrompts(), "heldout", n, _ctx(work_dir, tracking_uri, "prompts"), return_state=True)
    return {"state": state.name, "ref": state.result().model_dump()}


@task(**task_options("probe-stage"))
def probe_stage(tag: str, ctx: RoundContext, hold: str = "") -> ArtifactRef:
    """Marks that it ran (one file per process), waits for ``hold`` to exist, writes a tiny table artifact."""
    Path(ctx.work_dir, f"ran-{os.getpid()}").touch()
    deadline = time.monotonic() + 180
    while hold and not Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    ref = write_table(pd.DataFrame({"x": [1, 2, 3]}), output_dir(ctx.work_dir, "probe", {}, {"tag": tag}),
                      name="probe", producer="probe")
    ctx.record("probe", {}, {"probe": ref}, {"tag": tag})
    return ref


@flow(name="result-store-probe")
def probe_flow(work_dir: str, tracking_uri: str, hold: str = "") -> dict:
    (probe_t,) = with_result_store(work_dir, probe_stage)
    state = probe_t("same", _ctx(work_dir, tracking_uri, "probe"), hold, return_state=True)
    return {"state": state.name, "ref": state.result().model_dump()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    print(json.dumps(probe_flow(sys.argv[1], sys.argv[2], sys.argv[3])), flush=True)
