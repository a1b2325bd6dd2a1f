"""The smoke round end to end: real vLLM, real TRL training, real Prefect (test harness server), real MLflow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from pipeline_lib.artifacts import read_manifest, read_table, ref_from_dir, verify
from pipeline_lib.config import load_config

pytestmark = pytest.mark.slow

STAGE_RUNS = {"prompts-train", "prompts-heldout", "collect", "annotate", "pair", "train", "evaluate-champion",
              "evaluate-candidate"}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def pipeline(harness, tmp_path_factory):
    """flows/smoke.py: one full round, then every other loss once on the same judged samples."""
    from flows.smoke import smoke_pipeline

    tmp = tmp_path_factory.mktemp("smoke")
    cfg = load_config("configs/smoke.yaml", [f"run.work_dir={tmp / 'work'}",
                                             f"run.mlflow_tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                                             "run.quiet=true"])
    state = smoke_pipeline(cfg, return_state=True)
    return cfg, state.result(), state


@pytest.fixture(scope="module")
def smoke(pipeline):
    """The first (complete) round of the smoke pipeline, with its own flow-run state."""
    cfg, result, _ = pipeline
    summary = result["round"]

    class _State:  # the round's own flow-run id, as MLflow recorded it
        class state_details:
            flow_run_id = _mlflow_flow_run_id(cfg, summary["mlflow_run_id"])

    return cfg, summary, _State


def _mlflow_flow_run_id(cfg, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.run.mlflow_tracking_uri).get_run(run_id).data.tags["prefect.flow_run_id"]


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as c:
            return await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(go())


def _task_states(flow_run_id):
    return {r.name: r.state.name for r in _task_runs(flow_run_id)}


def _children(cfg, parent_id):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.run.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(cfg.run.experiment)
    return c, c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_every_artifact_has_a_manifest_matching_its_content(smoke):
    cfg, summary, _ = smoke
    for name, sha in summary["artifacts"].items():
        path = summary["checkpoint_path"] if name == "checkpoint" else None
        refs = [ref_from_dir(p) for p in (cfg_paths(cfg, sha) if path is None else [path])]
        assert refs, f"no artifact directory for {name}"
        for ref in refs:
            verify(ref)  # recomputes the content hash
            assert ref.sha256 == sha and read_manifest(ref.path)["sha256"] == sha


def cfg_paths(cfg, sha):
    from pathlib import Path

    return [m.parent for m in Path(cfg.run.work_dir).glob("artifacts/*/*/manifest.json")
            if read_manifest(m.parent)["sha256"] == sha]


def test_mlflow_has_parent_and_child_runs_with_matching_digests(smoke):
    cfg, summary, state = smoke
    c, children = _children(cfg, summary["mlflow_run_id"])
    assert {r.info.run_name for r in children} == STAGE_RUNS
    parent = c.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert _task_states(parent.data.tags["prefect.flow_run_id"])  # the id is a real Prefect flow run
    shas = set(summary["artifacts"].values())
    for run in children:
        assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
        for d in run.inputs.dataset_inputs:
            tags = {t.key: t.value for t in d.tags}
            assert d.dataset.digest == tags["alignflow.sha256"][:36]
            if tags["mlflow.data.context"] == "output":
                assert tags["alignflow.sha256"] in shas | {summary_eval_sha(cfg, run)}
    train = next(r for r in children if r.info.run_name == "train")
    outs = [d for d in train.inputs.dataset_inputs if {t.key: t.value for t in d.tags}["alignflow.role"] == "checkpoint"]
    assert outs[0].dataset.digest == summary["artifacts"]["checkpoint"][:36]
    assert "loss" in train.data.metrics
    mv = c.get_model_version(cfg.run.registered_model, summary["candidate_version"])
    assert mv.tags["alignflow.sha256"] == summary["artifacts"]["checkpoint"]
    assert mv.run_id == summary["mlflow_run_id"]


def summary_eval_sha(cfg, run):
    return run.data.tags.get("output.evaluation", "")


def _seq_logps(model, tok, prompt_texts, responses):
    out = []
    for p, r in zip(prompt_texts, responses):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(r + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        lp = logp.gather(-1, tgt[:, None])[:, 0][len(p_ids) - 1:]
        out.append(lp.sum().item())
    return torch.tensor(out)


def test_training_changed_the_model_and_raised_the_preference_margin(smoke, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary, _ = smoke
    assert summary["artifacts"]["checkpoint"] != tiny_model.sha256
    pairs = read_table(ref_from_dir(cfg_paths(cfg, summary["artifacts"]["pairs"])[0]))
    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    before = AutoModelForCausalLM.from_pretrained(tiny_model.path, dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(summary["checkpoint_path"], dtype=torch.float32)
    diff = max((a - b).abs().max().item() for a, b in zip(before.parameters(), after.parameters()))
    assert diff > 0
    margin = {}
    for name, m in (("before", before), ("after", after)):
        w = _seq_logps(m, tok, pairs.prompt_text, pairs.chosen)
        l = _seq_logps(m, tok, pairs.prompt_text, pairs.rejected)
        margin[name] = (w - l).mean().item()
    # DPO log-ratio margin: [log pi(yw) - log ref(yw)] - [log pi(yl) - log ref(yl)], ref = the initial policy
    assert margin["after"] - margin["before"] > 0.5, margin


def test_rerun_hits_the_cache_for_every_stage_and_logs_no_duplicate_runs(smoke):
    from flows.round import alignment_round

    cfg, summary, _ = smoke
    _, children_before = _children(cfg, summary["mlflow_run_id"])
    state = alignment_round(cfg, return_state=True)
    again = state.result()
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]  # the same parent run, resumed
    assert again["artifacts"] == summary["artifacts"]
    states = _task_states(state.state_details.flow_run_id)
    stage_states = {n: s for n, s in states.items() if not n.startswith("resolve-model")}
    assert stage_states and all(s == "Cached" for s in stage_states.values()), states
    _, children_after = _children(cfg, summary["mlflow_run_id"])
    assert len(children_after) == len(children_before)


def test_a_new_mlflow_store_gets_every_stage_run_again(smoke, tmp_path):
    """Issue 22: the same round on a new MLflow store with the task cache warm. Before: cache hits, a parent run with
    no stage runs, nothing said. Now every stage runs again against its existing artifact (same digests, no
    recomputation: the artifacts' files are untouched) and logs its run in the new store."""
    from flows.round import alignment_round

    cfg, summary, _ = smoke
    paths = [p for p in Path(cfg.run.work_dir).glob("artifacts/*/*/manifest.json")]
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    new = cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'new.db'}"})})
    again = alignment_round(new)
    assert again["artifacts"] == summary["artifacts"]
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes
    _, children = _children(new, again["mlflow_run_id"])
    assert {r.info.run_name for r in children} == STAGE_RUNS


def test_stage_task_runs_carry_no_tags(smoke):
    """Prefect 3.7 takes a tag concurrency lease for every tagged task run, and on the embedded SQLite server that
    write meets "database is locked" at task start and is retried ~2 s later (tasks/common.py task_options): the
    round's stage tasks must run untagged. The GPU cap is the explicit `gpu` limit, which this config leaves unset."""
    cfg, _, state = smoke
    runs = _task_runs(state.state_details.flow_run_id)
    stages = {r.name.rsplit("-", 1)[0] for r in runs}
    assert {"prompts", "collect", "annotate", "pair", "train", "evaluate"} <= stages, stages
    assert {r.name: r.tags for r in runs if r.tags} == {}
    assert cfg.run.gpu_concurrency_limit == ""


def test_every_loss_trained_once_on_the_same_samples(pipeline):
    from mlflow.tracking import MlflowClient

    from flows.smoke import VARIANTS

    cfg, result, _ = pipeline
    first = result["round"]
    assert set(result["variants"]) == {name for name, _, _ in VARIANTS}
    c = MlflowClient(cfg.run.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(cfg.run.experiment)
    for name, summary in result["variants"].items():
        # same prompts, generations and judgments (cache hits), a new checkpoint for each loss; SAIL-PP's unlabelled
        # pairs read no verdicts, so that round has no judgments at all
        judged = name != "sail_pp"
        for key in ("prompts_train", "generations", "judgments")[:3 if judged else 2]:
            assert summary["artifacts"][key] == first["artifacts"][key], (name, key)
        assert judged == ("judgments" in summary["artifacts"]), name
        assert summary["artifacts"]["checkpoint"] != first["artifacts"]["checkpoint"]
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
        names = {r.info.run_name for r in runs}
        assert "train" in names and "collect" not in names, (name, names)
        train = next(r for r in runs if r.info.run_name == "train")
        assert train.data.params["method.loss"] == {"dpo_wpo": "dpo", "sail_pp": "sail"}.get(name, name)
        assert "loss" in train.data.metrics
    # SPPO's pairs: argmax / argmin of the win-probability (with a pointwise judge, Bradley-Terry on the scores,
    # so the same responses as best-vs-worst, now carrying P-hat(y > pi) for the loss)
    sppo_pairs = read_table(ref_from_dir(cfg_paths(cfg, result["variants"]["sppo"]["artifacts"]["pairs"])[0]))
    assert (sppo_pairs.chosen_winprob > sppo_pairs.rejected_winprob).all()
    assert ((sppo_pairs.chosen_winprob > 0) & (sppo_pairs.chosen_winprob < 1)).all()
    assert "last_wpo_weight" in c.get_run(_train_run(c, exp, result["variants"]["dpo_wpo"])).data.metrics
    # SAIL-PP's pairs come straight from the generations: samples (0, 1), (2, 3) of every prompt, no judge's scores
    pp_pairs = read_table(ref_from_dir(cfg_paths(cfg, result["variants"]["sail_pp"]["artifacts"]["pairs"])[0]))
    assert "chosen_score" not in pp_pairs.columns and len(pp_pairs) == 2 * cfg.prompts.n_train
    assert sorted(set(zip(pp_pairs.chosen_sample_index, pp_pairs.rejected_sample_index))) == [(0, 1), (2, 3)]


def _train_run(c, exp, summary):
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    return next(r for r in runs if r.info.run_name == "train").info.run_id
