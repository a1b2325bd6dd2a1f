"""bench.efficacy's per-method table: which method a run is, which runs count, and the mean over seeds with its
t-interval worked out by hand."""

from __future__ import annotations

import json

import pytest

from bench.efficacy import method_of, method_rows


def _round(loss="dpo", weighting="none", reference="initial", strategy="best_worst", optimizer="adamw", seed=0):
    return {"train": {"loss": loss, "weighting": weighting, "reference": reference, "optimizer": optimizer,
                      "seed": seed, "sail": {"score_term": "baseline", "score_coef": 1.0}},
            "pairs": {"strategy": strategy, "winprob": "authors"}}


def test_method_of_picks_the_most_specific_match():
    assert method_of(_round()) == "dpo"
    assert method_of(_round(weighting="wpo")) == "wpo"  # matches dpo's switches too: the more specific wins
    assert method_of(_round(reference="behavior")) == "bpo"
    assert method_of(_round(loss="sppo", reference="behavior", strategy="sppo_winprob", optimizer="rmsprop")) == "sppo"
    assert method_of(_round(loss="sail", strategy="iid_pairs", optimizer="rmsprop")) == "sail"
    assert method_of(_round(loss="ipo")) is None


def _record(tmp_path, label, delta, seed, overrides, rnd, rounds=6, status="ok", config_file="configs/ifeval_campaign.yaml",
            extra=None):
    r = {"label": label, "status": status, "config_file": config_file, "overrides": overrides,
         "config": {"rounds": rounds, "round": rnd}, **(extra or {}),
         "paired": {"ifeval.prompt_level_strict": {"delta": delta, "ci_low": delta - 0.03, "ci_high": delta + 0.03},
                    "pass_rate_strict": {"delta": 0.1}}}
    (tmp_path / f"{label}.json").write_text(json.dumps(r))


def test_method_rows_mean_and_t_interval_over_seeds(tmp_path):
    seeds = [f"round.{k}.seed={{s}}" for k in ("prompts", "collect", "train")]
    for s, d in ((0, 0.06), (1, 0.07), (2, 0.08)):
        # seed 1 ran on another CPU; seed 2's file predates the machine record
        extra = {"after": {"ifeval.truncated_share": 0.5 + s / 10}, "rounds_wall_s": 3000 + 60 * s,
                 **({} if s == 2 else {"machine": {"cpu": "AMD EPYC" if s == 0 else "Intel Xeon"}})}
        _record(tmp_path, f"wpo{s}", d, s, [x.format(s=s) for x in seeds] + ["round.train.weighting=wpo"],
                _round(weighting="wpo", seed=s), extra=extra)
    _record(tmp_path, "dpo0", 0.05, 0, [], _round())
    # another lever overridden: a row of its own, named by the override (here two seeds at that setting)
    _record(tmp_path, "dpo-lr", 0.01, 0, ["round.train.learning_rate=1e-5"], _round())
    _record(tmp_path, "dpo-lr1", 0.03, 1, ["round.train.seed=1", "round.train.learning_rate=1e-5"], _round(seed=1))
    # not counted: another round count, a failed run, another config file
    _record(tmp_path, "dpo-3rounds", 0.02, 0, ["rounds=3"], _round(), rounds=3)
    _record(tmp_path, "dpo-failed", 0.0, 0, [], _round(), status="failed")
    _record(tmp_path, "other", 0.0, 0, [], _round(), config_file="configs/default.yaml")
    listed = method_rows(tmp_path)
    rows = {r["method"]: r for r in listed}
    assert [r["method"] for r in listed] == ["dpo", "dpo (train.learning_rate=1e-5)", "wpo"]  # METHODS' order
    assert rows["dpo (train.learning_rate=1e-5)"]["runs"] == "dpo-lr, dpo-lr1"
    assert rows["dpo (train.learning_rate=1e-5)"]["mean Δ"] == "+0.020"
    assert rows["dpo"]["seeds"] == 1 and "95% t-interval over seeds" not in rows["dpo"]
    w = rows["wpo"]
    assert w["seeds"] == 3 and w["mean Δ"] == "+0.070"
    # mean 0.07, sample sd 0.01, sem 0.01/sqrt(3); t(0.975, 2 df) = 4.3027: half-width 0.02484
    assert w["95% t-interval over seeds"] == "[+0.045, +0.095]"
    assert w["per seed: IFEval prompt strict Δ (95% CI)"].startswith("seed 0: +0.060 [+0.030, +0.090]")
    assert w["runs"] == "wpo0, wpo1, wpo2"
    assert w["IFEval answers at the limit after, per seed"] == "50%; 60%; 70%"
    assert w["rounds' wall min per seed (machine)"] == "50.0 (AMD EPYC); 51.0 (Intel Xeon); 52.0"
    # files without those fields leave the cells empty rather than inventing a value
    assert rows["dpo"]["IFEval answers at the limit after, per seed"] == ""
    assert rows["dpo"]["rounds' wall min per seed (machine)"] == ""


def test_compact_methods_table_has_a_column_per_seed(tmp_path):
    """The README's form: seeds as columns (a seed without a run says so), mean and t-interval in one cell, the
    per-seed cells in seed order whatever order the files come in, the CPU by its last word."""
    from bench.efficacy import compact_methods_table

    for s, d in ((2, 0.08), (0, 0.06), (1, 0.07)):
        _record(tmp_path, f"wpo{s}", d, s, [f"round.train.seed={s}", "round.train.weighting=wpo"],
                _round(weighting="wpo", seed=s),
                extra={"after": {"ifeval.truncated_share": 0.5 + s / 10}, "rounds_wall_s": 3000 + 60 * s,
                       "machine": {"cpu": "Intel(R) Xeon(R) Processor" if s == 1 else "AMD EPYC"}})
    _record(tmp_path, "dpo1", 0.05, 1, ["round.train.seed=1"], _round(seed=1))
    lines = compact_methods_table(method_rows(tmp_path)).splitlines()
    assert lines[0] == ("| method | seed 0 | seed 1 | seed 2 | mean, 95% t-interval over seeds | held-out Δ per seed "
                        "| at the limit after | rounds' wall (min) |")
    assert lines[2] == "| dpo | not run | +0.050 [+0.020, +0.080] | not run | +0.050 | +0.10 |  |  |"
    assert lines[3] == ("| wpo | +0.060 [+0.030, +0.090] | +0.070 [+0.040, +0.100] | +0.080 [+0.050, +0.110] "
                        "| +0.070 [+0.045, +0.095] | +0.10, +0.10, +0.10 | 50%, 60%, 70% "
                        "| 50.0 (EPYC), 51.0 (Xeon), 52.0 (EPYC) |")


@pytest.mark.parametrize("argv, says", [(["--method", "nope", "--config", "c.yaml", "--label", "x"], "--method nope"),
                                        (["--compact"], "--compact is a form of --methods-table")])
def test_bad_arguments_are_refused(argv, says, capsys):
    from bench.efficacy import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def _ifeval_artifact(work_dir, name, sha, strict_all):
    import pandas as pd

    d = work_dir / "artifacts" / "ifeval" / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"model": {"sha256": sha}}))
    pd.DataFrame({"key": [str(k) for k in range(len(strict_all))], "strict_all": strict_all, "loose_all": strict_all,
                  "strict_follow": [[bool(x)] for x in strict_all],
                  "loose_follow": [[bool(x)] for x in strict_all]}).to_parquet(d / "data.parquet")


def test_versus_pairs_two_runs_final_models_by_their_checkpoint_hash(tmp_path):
    from bench.efficacy import versus

    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    for label, sha in (("a", "aa" * 32), ("b", "bb" * 32)):
        (results / f"{label}.json").write_text(json.dumps({"label": label, "rounds": [{"checkpoint": sha}]}))
    # 10 prompts: B gains prompts 0-3 and loses prompt 9 against A; the start model's table is there too
    _ifeval_artifact(work, "k0", "00" * 32, [0] * 10)
    _ifeval_artifact(work, "k1", "aa" * 32, [0, 0, 0, 0, 1, 1, 0, 0, 0, 1])
    _ifeval_artifact(work, "k2", "bb" * 32, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    out = versus(results, "a", "b", work)["prompt_level_strict"]
    assert (out["before"], out["after"], out["delta"]) == (0.3, 0.6, pytest.approx(0.3))
    assert (out["n_gained"], out["n_lost"]) == (4, 1)
    assert out["p_value"] == pytest.approx(12 / 32)  # two-sided exact binomial: 2 * P(X <= 1 | n=5, 1/2) = 2 * 6/32
    with pytest.raises(FileNotFoundError, match="no IFEval artifact of its final checkpoint cccccccccccc"):
        (results / "c.json").write_text(json.dumps({"label": "c", "rounds": [{"checkpoint": "cc" * 32}]}))
        versus(results, "a", "c", work)


def test_versus_from_result_files_alone_matches_the_artifact_store(tmp_path):
    """A result file carries its final model's per-prompt table (as run() writes it, through JSON): the head-to-head
    needs no work dir and gives what the artifact store gives."""
    import pandas as pd

    from bench.efficacy import compact_ifeval, versus

    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    tables = {"a": [0, 0, 0, 0, 1, 1, 0, 0, 0, 1], "b": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]}
    for label, strict in tables.items():
        sha = label * 64
        _ifeval_artifact(work, f"k{label}", sha, strict)
        scored = pd.read_parquet(work / "artifacts" / "ifeval" / f"k{label}" / "data.parquet")  # lists as arrays
        (results / f"{label}.json").write_text(json.dumps({"label": label, "rounds": [{"checkpoint": sha}],
                                                           "final_ifeval": compact_ifeval(scored)}))
    from_files = versus(results, "a", "b", None)
    (results / "a.json").write_text(json.dumps({"label": "a", "rounds": [{"checkpoint": "a" * 64}]}))
    from_store = versus(results, "a", "b", work)  # a from the store, b from its file
    assert from_files == from_store
    assert (from_files["prompt_level_strict"]["n_gained"], from_files["prompt_level_strict"]["n_lost"]) == (4, 1)
    with pytest.raises(FileNotFoundError, match="no per-prompt IFEval table"):
        versus(results, "a", "b", None)


def test_cache_hits_name_what_the_rounds_skipped():
    from bench.efficacy import cache_hits, cached_in

    summary = {"cost": {"stages": [{"stage": "collect", "cached": True}, {"stage": "prompts-train", "cached": True},
                                   {"stage": "train", "cached": False, "wall_s": 90.0}]}}
    assert cached_in(summary) == ["collect", "prompts-train"]
    assert cached_in({}) == []  # a round summary without a cost table: nothing known to be cached
    rounds = [{"cached": ["prompts-heldout", "collect", "annotate"]}, {"cached": ["prompts-heldout", "collect"]},
              {"cached": ["prompts-train"]}]
    # the prompt sets are cheap and not counted; the heavy stages are counted over the rounds, in first-seen order
    assert cache_hits({"rounds": rounds}) == "collect 2, annotate 1"
    assert cache_hits({"rounds": [{"cached": ["prompts-heldout"]}]}) == "none"
    # result files from before the list existed say so instead of pretending nothing was cached
    assert cache_hits({"rounds": [{"pairs": {}}]}) == "not recorded"
    assert cache_hits({"rounds": []}) == "not recorded"
