"""``evaluate_model`` end to end: the tiny policy (``tiny:0``) through the real vLLM worker, a real ``vllm serve`` of a
tiny judge model on 127.0.0.1 (the LLM judge's ``http`` backend), real Prefect (test harness), real MLflow (SQLite).

Data: the 4 AlpacaEval instructions whose instruction + reference output are shortest (written to a JSON file with
their original ``index``, so the shared instruction-difficulty estimate applies), and MT-Bench questions 104
(reasoning: reference-guided templates) and 140 (extraction: plain templates). Every generation is greedy with 16
new tokens, so AlpacaEval and MT-Bench turn 1 share one vLLM worker call and turn 2 takes one more.

The judge model is the LLM-judge integration tests' tiny random Llama (tests/integration/test_llm_judge_vllm.py),
whose replies hold the identifiers and ``[[n]]`` ratings; its position limit is raised to 2048 here because
AlpacaEval's template with a reference output is longer than 512 tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import time

import numpy as np
import pytest
import yaml

from pipeline_lib.cli import main as cli_main
from pipeline_lib.artifacts import read_manifest, read_table, ref_from_dir, sha256_file, verify
from pipeline_lib.evaluation import alpaca_eval as ae
from pipeline_lib.evaluation import bench_config as bc
from pipeline_lib.evaluation import benchmarks as bm
from pipeline_lib.evaluation import mt_bench as mtb
from tests.conftest import shared_dir
from tests.integration._servers import start_vllm_serve, stop, tail

pytestmark = pytest.mark.slow

QUESTION_IDS = [104, 140]
N_ALPACA = 4
JUDGE_MAX_TOKENS = 1  # one-token replies: "[[n]]" or an identifier such as "M" (no rating: counted invalid)


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """``vllm serve`` of the tiny judge model on a free loopback port; yields (API root, model directory)."""
    from tests.integration.test_llm_judge_vllm import build_judge_model

    model_dir = tmp_path_factory.mktemp("eval-judge-model")
    build_judge_model(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 2048
    (model_dir / "config.json").write_text(json.dumps(cfg))
    log = tmp_path_factory.mktemp("eval-vllm-serve") / "serve.log"
    proc, port = start_vllm_serve(model_dir, 2048, log)
    try:
        yield proc, port, log, model_dir
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def evaluated(judge_server, tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.evaluate import evaluate_model

    proc, port, log, judge_dir = judge_server
    tmp = tmp_path_factory.mktemp("evaluate")
    rows = json.loads((shared_dir() / "data" / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json").read_text())
    rows = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["output"]))[:N_ALPACA]
    (tmp / "eval_set.json").write_text(json.dumps(rows))
    mt = shared_dir() / "data" / "mt_bench"
    # The server is still loading while the policy generates (about as long): the judge's retries on refused
    # connections (capped backoff) carry the judge stages over until it answers.
    judge = {"kind": "llm", "backend": "http", "base_url": f"http://127.0.0.1:{port}/v1", "model": str(judge_dir),
             "max_tokens": JUDGE_MAX_TOKENS, "max_retries": 200, "backoff_s": 0.5, "max_backoff_s": 2.0}
    cfg = bc.EvaluateModelConfig.model_validate({
        "alpaca_eval": {"eval_set": str(tmp / "eval_set.json"),
                        "instruction_difficulty": str(shared_dir() / "data" / "alpaca_eval" /
                                                      "instruction_difficulty_estimated.csv"),
                        "generation": {"temperature": 0.0, "max_tokens": 16}},
        "mt_bench": {"questions": str(mt / "question.jsonl"), "question_ids": QUESTION_IDS,
                     "reference_answers": str(mt / "reference_answer_gpt-4.jsonl"),
                     "judge_prompts": str(mt / "judge_prompts.jsonl"), "max_tokens": 16},
        "run": {"work_dir": str(tmp / "work"), "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "experiment": "evaluate-e2e", "quiet": True}})
    cli_yaml = tmp / "evaluate.yaml"
    cli_yaml.write_text(yaml.safe_dump({**cfg.model_dump(), "judge": judge}))
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        try:
            summary = evaluate_model("tiny:0", judge=judge, config=cfg)
        except Exception as e:
            pytest.fail(f"evaluate_model failed: {e!r}\nvllm serve log:\n{tail(log)}")
        wall = time.perf_counter() - t0
        artifacts = _prefect_artifacts()
        # the same evaluation again through the command line: every task is a cache hit
        t1 = time.perf_counter()
        buf, uri = io.StringIO(), os.environ.get("MLFLOW_TRACKING_URI")
        with contextlib.redirect_stdout(buf):
            rc = cli_main(["evaluate", "--model", "tiny:0", "--config", str(cli_yaml), "--json", "--quiet"])
        if uri is None:  # the command sets it for its process; leave the session as it was
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        again = json.loads(buf.getvalue())
        cli_wall = time.perf_counter() - t1
    return {"summary": summary, "cfg": cfg, "judge": judge, "rows": rows, "wall_s": wall, "artifacts": artifacts,
            "cli": (rc, again, cli_wall)}


def _prefect_artifacts() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as c:
            return {a.key: a for a in await c.read_artifacts() if a.key}

    return asyncio.run(go())


def _ref(path):
    ref = ref_from_dir(path)
    verify(ref)  # the manifest's sha256 is the table's content hash
    return ref


def test_artifacts_have_manifests_matching_their_content(evaluated):
    """Every stage table verifies against its manifest; the row counts are the selection's (4 instructions, 2
    questions, 2 turns each); each manifest records what produced it: the generation config, the judge identity
    (no address or key), the eval data's artifact hash."""
    s = evaluated["summary"]["benchmarks"]
    outputs, ann = _ref(s["alpaca_eval"]["outputs"]), _ref(s["alpaca_eval"]["annotations"])
    answers, ratings = _ref(s["mt_bench"]["answers"]), _ref(s["mt_bench"]["ratings"])
    assert (outputs.rows, ann.rows, answers.rows, ratings.rows) == (N_ALPACA, N_ALPACA, 2, 4)
    m_out = read_manifest(outputs.path)
    assert m_out["generation"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0, "kv_cache_gib": 1.0}
    eval_ref = _ref(m_out["eval_set"]["path"])
    assert eval_ref.sha256 == m_out["eval_set"]["sha256"] == m_out["inputs"]["eval_set"]
    eval_df = read_table(eval_ref)
    assert eval_df["index"].tolist() == [r["index"] for r in sorted(evaluated["rows"], key=lambda r: r["index"])]
    m_ann = read_manifest(ann.path)
    assert m_ann["judge"]["protocol"] == "alpaca_eval" and m_ann["inputs"]["outputs"] == outputs.sha256
    assert "base_url" not in json.dumps(m_ann["judge"]) and m_ann["judge"]["model_sha256"]
    m_ans = read_manifest(answers.path)
    assert m_ans["generation"]["temperature"]["reasoning"] == 0.0 and m_ans["generation"]["max_tokens"] == 16
    assert read_manifest(ratings.path)["judge"]["protocol"] == "mt_bench"


def test_generation_shares_worker_calls_and_keeps_turn_one_in_context(evaluated):
    """AlpacaEval and MT-Bench turn 1 (all greedy, 16 tokens) ran in one vLLM worker call, turn 2 in one more; every
    answer is at most 16 tokens; turn 2's answers exist for both questions."""
    s = evaluated["summary"]["benchmarks"]
    m_out = read_manifest(s["alpaca_eval"]["outputs"])["metrics"]
    m_ans = read_manifest(s["mt_bench"]["answers"])["metrics"]
    assert m_out["worker_calls_shared"] == 1 and m_ans["worker_calls_shared"] == 1
    assert m_ans["worker_calls_turn2"] == 1
    answers = read_table(ref_from_dir(s["mt_bench"]["answers"]))
    assert answers["question_id"].tolist() == QUESTION_IDS
    assert [len(a) for a in answers["answers"]] == [2, 2]
    assert all(1 <= n <= 16 for ns in answers["n_tokens"] for n in ns)
    assert m_ans["generated_tokens"] == sum(n for ns in answers["n_tokens"] for n in ns)


def test_alpaca_metrics_equal_score_annotations_of_the_table(evaluated):
    """The manifest's metrics are ``score_annotations`` recomputed from the annotation table with the same
    difficulty file (values, LC win rate included); preference = 1 + P(model > reference) in [1, 2]; output_1 is the
    reference output of the eval set, output_2 the model's; n_total = 4."""
    s = evaluated["summary"]["benchmarks"]["alpaca_eval"]
    table = read_table(ref_from_dir(s["annotations"]))
    outs = read_table(ref_from_dir(s["outputs"]))
    by_index = {r["index"]: r["output"] for r in evaluated["rows"]}
    assert table["output_1"].tolist() == [by_index[i] for i in table["index"]]
    assert table["output_2"].tolist() == outs["output"].tolist()
    assert np.allclose(table["preference"], 1.0 + table["p_model_better"])
    assert ((table["p_model_better"] > 0) & (table["p_model_better"] < 1)).all()
    expected = ae.score_annotations(table, evaluated["cfg"].alpaca_eval.instruction_difficulty)
    expected.pop("glm")
    got = read_manifest(s["annotations"])["metrics"]
    assert got["n_total"] == N_ALPACA and got["n_no_verdict"] == 0
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    # win rate by hand: 100 * mean(P(model > reference))
    assert got["win_rate"] == pytest.approx(100 * table["p_model_better"].mean())
    assert s["metrics"] == got


def test_mt_bench_ratings_per_turn_with_invalid_counted(evaluated):
    """One rating per (question, turn) with the template of its category (reasoning: reference-guided); each rating
    equals ``parse_rating`` of the judge's reply to the same request sent again (temperature 0), NaN where the reply
    holds none; per-turn counts n_valid + n_invalid = 2 and n_invalid = the NaN ratings of that turn."""
    from pipeline_lib.judges.base import Item, build_judge

    s = evaluated["summary"]["benchmarks"]["mt_bench"]
    table = read_table(ref_from_dir(s["ratings"]))
    answers = read_table(ref_from_dir(s["answers"])).set_index("question_id")
    assert table[["question_id", "turn"]].values.tolist() == [[104, 1], [104, 2], [140, 1], [140, 2]]
    assert table["template"].tolist() == ["single-math-v1", "single-math-v1-multi-turn", "single-v1",
                                          "single-v1-multi-turn"]
    cfg = bc.judge_options(evaluated["judge"], "mt_bench", evaluated["cfg"].mt_bench.judge_prompts)
    judge = build_judge(cfg)
    refs = mtb.load_reference_answers(evaluated["cfg"].mt_bench.reference_answers)
    reqs = []
    for r in table.itertuples(index=False):
        a = answers.loc[r.question_id]
        meta = {"category": r.category, "turns": list(a["turns"])[:r.turn], "answers": list(a["answers"])[:r.turn],
                "turn": r.turn, "reference": refs[r.question_id] if r.reference_guided else None}
        reqs.append(judge.protocol.request("", "", meta, 0))
    replies = [mtb.parse_rating(x.text) for x in judge.client.chat_many(reqs)]
    judge.close()
    assert [None if math.isnan(x) else x for x in table["rating"]] == replies
    m = read_manifest(s["ratings"])["metrics"]
    for t in (1, 2):
        g = table[table["turn"] == t]["rating"]
        assert m[f"turn_{t}.n_valid"] + m[f"turn_{t}.n_invalid"] == 2
        assert m[f"turn_{t}.n_invalid"] == int(g.isna().sum())
        if g.notna().any():
            assert m[f"turn_{t}.score"] == pytest.approx(g.mean())
    assert m["n_invalid"] == int(table["rating"].isna().sum()) >= 1  # the judge's "M" for question 140 turn 1
    summary = read_manifest(s["ratings"])["summary"]
    assert summary == json.loads(json.dumps(mtb.aggregate(table)))


def test_chart_is_a_png_beside_the_artifact(evaluated):
    """The per-category chart exists next to the ratings artifact, is a PNG (signature, IHDR, size > 0) and hashes
    to what the manifest recorded."""
    s = evaluated["summary"]["benchmarks"]["mt_bench"]
    chart = bm.chart_path(s["ratings"])
    assert str(chart) == s["chart"] and chart.is_file()
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 700 and height > 0  # figsize 7 in at 100 dpi
    assert sha256_file(chart) == read_manifest(s["ratings"])["chart"]["sha256"]


def test_mlflow_parent_and_child_runs_with_digests_and_judge_identity(evaluated):
    """Parent "evaluate tiny:0" with headline metrics; one child run per stage; each logs its eval data (input) and
    its output as datasets whose digests are the artifacts' sha256; the judge's identity as params (never its
    address); the child's metrics equal the manifest's; the chart is an artifact of the MT-Bench judge run."""
    from mlflow.tracking import MlflowClient

    cfg, summary = evaluated["cfg"], evaluated["summary"]
    c = MlflowClient(cfg.run.mlflow_tracking_uri)
    parent = c.get_run(summary["mlflow_run_id"])
    assert parent.info.run_name == "evaluate tiny:0" and parent.info.status == "FINISHED"
    ann_m = summary["benchmarks"]["alpaca_eval"]["metrics"]
    assert parent.data.metrics["alpaca_eval.win_rate"] == pytest.approx(ann_m["win_rate"])
    exp = c.get_experiment_by_name(cfg.run.experiment)
    kids = {r.info.run_name: r for r in c.search_runs([exp.experiment_id],
                                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(kids) == {"alpaca_eval-generate", "mt_bench-generate", "alpaca_eval-annotate", "mt_bench-judge"}
    s = summary["benchmarks"]
    outputs = {"alpaca_eval-generate": s["alpaca_eval"]["outputs"], "mt_bench-generate": s["mt_bench"]["answers"],
               "alpaca_eval-annotate": s["alpaca_eval"]["annotations"], "mt_bench-judge": s["mt_bench"]["ratings"]}
    eval_data = {"alpaca_eval": read_manifest(s["alpaca_eval"]["outputs"])["eval_set"]["sha256"],
                 "mt_bench": read_manifest(s["mt_bench"]["answers"])["questions"]["sha256"]}
    for name, run in kids.items():
        ds = {({t.key: t.value for t in d.tags}["alignflow.role"]): d.dataset.digest for d in run.inputs.dataset_inputs}
        assert ds["eval_data"] == eval_data[name.split("-")[0]][:36], name
        out_sha = read_manifest(outputs[name])["sha256"]
        assert out_sha[:36] in ds.values(), name
        man_metrics = read_manifest(outputs[name])["metrics"]
        for k, v in man_metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                assert run.data.metrics[k] == pytest.approx(v), (name, k)
    for name in ("alpaca_eval-annotate", "mt_bench-judge"):
        p = kids[name].data.params
        assert p["judge.kind"] == "llm" and p["judge.model_sha256"] and "127.0.0.1" not in json.dumps(p)
    assert kids["mt_bench-judge"].data.params["judge.protocol"] == "mt_bench"
    assert kids["alpaca_eval-generate"].data.params["generation.max_tokens"] == "16"
    arts = [a.path for a in c.list_artifacts(kids["mt_bench-judge"].info.run_id, "charts")]
    assert arts == [f"charts/{bm.chart_path(s['mt_bench']['ratings']).name}"]


def test_prefect_artifacts(evaluated):
    """A summary table per benchmark (values from the manifests) and the chart as a markdown artifact with the PNG
    inline."""
    import base64

    arts, s = evaluated["artifacts"], evaluated["summary"]["benchmarks"]
    table = {r["metric"]: r["value"] for r in _table(arts["alpaca-eval-summary"])}
    assert table["win_rate"] == pytest.approx(s["alpaca_eval"]["metrics"]["win_rate"])
    assert table["n_total"] == N_ALPACA
    rows = {r["group"]: r for r in _table(arts["mt-bench-summary"])}
    assert rows["turn 1"]["n_valid"] + rows["turn 1"]["n_invalid"] == 2
    png = base64.b64encode(bm.chart_path(s["mt_bench"]["ratings"]).read_bytes()).decode()
    assert png in arts["mt-bench-chart"].data


def _table(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_cli_rerun_reuses_every_stage(evaluated):
    """``alignflow evaluate --model tiny:0 --config FILE`` with the same settings exits 0 and reports the same
    metrics, artifacts and MLflow parent run (found again by its key); the cached stages log no second child run."""
    from mlflow.tracking import MlflowClient

    rc, again, cli_wall = evaluated["cli"]
    first = evaluated["summary"]
    assert rc == 0
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert json.loads(json.dumps(again["benchmarks"])) == json.loads(json.dumps(first["benchmarks"]))
    c = MlflowClient(evaluated["cfg"].run.mlflow_tracking_uri)
    exp = c.get_experiment_by_name(evaluated["cfg"].run.experiment)
    assert len(c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")) == 4
    print(f"evaluate_model {evaluated['wall_s']:.1f} s; cached re-run via the CLI {cli_wall:.1f} s")


def test_stage_functions_alone_find_the_flow_outputs(evaluated):
    """Each benchmark's artifacts are keyed by their own inputs and config: the plain stage functions, called one
    benchmark at a time with the flow's settings, return the artifacts the flow's shared generation wrote (no
    worker call, no judge request)."""
    from pipeline_lib.models import resolve

    cfg, s = evaluated["cfg"], evaluated["summary"]["benchmarks"]
    work, a, m = cfg.run.work_dir, cfg.alpaca_eval, cfg.mt_bench
    model = resolve("tiny:0")
    eval_set = bm.load_alpaca_set(a.eval_set, a.subset, a.subset_seed, work)
    outputs = bm.generate_benchmarks(model, work, alpaca=(eval_set, a.generation))["alpaca_eval"]
    assert outputs.path == s["alpaca_eval"]["outputs"]
    assert bm.alpaca_annotate(outputs, evaluated["judge"], work, a.instruction_difficulty).path == \
        s["alpaca_eval"]["annotations"]
    questions = bm.load_mt_bench_set(m.questions, m.n_questions, work, m.question_ids, m.subset_seed)
    answers = bm.generate_benchmarks(model, work, mt_bench=(questions, m.max_tokens, m.seed,
                                                            m.kv_cache_gib))["mt_bench"]
    assert answers.path == s["mt_bench"]["answers"]
    assert bm.mt_bench_judge(answers, evaluated["judge"], m.reference_answers, m.judge_prompts, work).path == \
        s["mt_bench"]["ratings"]


def test_bad_settings_fail_naming_the_key(tmp_path):
    """No judge, a judge that is no LLM, both question selections, an unknown question id: each a ValueError whose
    message names the setting (before any model is loaded)."""
    from pydantic import ValidationError

    with pytest.raises(ValueError, match=r"judge: required"):
        bc.judge_options({}, "alpaca_eval")
    with pytest.raises(ValidationError, match=r"judge.kind: 'rules'"):
        bc.EvaluateModelConfig(judge={"kind": "rules"})
    with pytest.raises(ValidationError, match=r"judge.base_url: required"):
        bc.EvaluateModelConfig(judge={"kind": "llm", "model": "m"})
    with pytest.raises(ValidationError, match=r"n_questions or question_ids"):
        bc.MTBenchConfig(n_questions=2, question_ids=[81])
    with pytest.raises(ValueError, match=r"question_ids: \[9999\] not in"):
        bm.load_mt_bench_set(str(shared_dir() / "data" / "mt_bench" / "question.jsonl"), None, tmp_path, [81, 9999])


def test_mt_bench_judge_options_drop_pairwise_settings():
    """The one judge config serves both protocols: mt_bench gets the judge-prompts file and loses the pairwise-only
    options; alpaca_eval loses judge_prompts."""
    judge = {"kind": "llm", "base_url": "http://127.0.0.1:1/v1", "model": "j", "swap_consistency": True,
             "top_logprobs": 5, "judge_prompts": "x.jsonl"}
    mt = bc.judge_options(judge, "mt_bench", "prompts.jsonl")
    assert mt["protocol"] == "mt_bench" and mt["judge_prompts"] == "prompts.jsonl"
    assert "swap_consistency" not in mt and "top_logprobs" not in mt
    al = bc.judge_options(judge, "alpaca_eval")
    assert al["protocol"] == "alpaca_eval" and "judge_prompts" not in al and al["swap_consistency"] is True
