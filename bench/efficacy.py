"""Does a campaign recipe make the model better? Run it and measure, paired, on IFEval and the builtin held-out set.

    python -m bench.efficacy --config configs/ifeval_campaign.yaml --label winner [key=value overrides]
    python -m bench.efficacy --config configs/ifeval_campaign.yaml --method wpo --label m-wpo-seed1 \
        round.prompts.seed=1 round.collect.seed=1 round.train.seed=1      # one method of bench.methods.METHODS
    python -m bench.efficacy --table          # the sweep table from every result file
    python -m bench.efficacy --methods-table  # the recipe's runs by method: each seed, and the mean over seeds
    python -m bench.efficacy --methods-table --compact   # the same in the README's form, one column per seed
    python -m bench.efficacy --versus s5-six-rounds-seed1 m-wpo-seed1 --work-dir runs/ifeval-campaign
                                              # two runs' final models head to head on IFEval, paired

One campaign (``flows/campaign.py``) with its final start-vs-last comparison, IFEval on (541 prompts, greedy): the
rounds' wall time (what the 60-minute budget counts), then IFEval's four metrics and the held-out metrics before
and after with paired 95% confidence intervals and McNemar's exact test, the truncated share, pairs and tied prompts
per round. Failures are recorded too (status ``failed`` with the error), because a sweep table that keeps only its
successes says nothing. Results: ``docs/bench-results/efficacy/<label>.json`` (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

from bench.common import machine, md_table

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench-results" / "efficacy"
IFEVAL = ["prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose"]


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(config: str, label: str, overrides: list[str], results: Path) -> dict:
    from flows.campaign import CampaignConfig, alignment_campaign
    from pipeline_lib.config import load_config

    over = list(overrides) + ["final_evaluation=true", "round.evaluate.ifeval.enabled=true"]
    cfg = load_config(config, over, model=CampaignConfig)
    record = {"label": label, "config_file": config, "overrides": list(overrides), "config": cfg.model_dump(),
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": _load_avg()}
    t0 = time.perf_counter()
    try:
        result = alignment_campaign(cfg)
        final = result["final"]
        record.update(status="ok", rounds_wall_s=final["rounds_wall_s"], before=final["before"],
                      after=final["after"], paired=final["paired"], mlflow_run_id=final["mlflow_run_id"],
                      rounds=[{"pairs": s["pairs"], "stage_s": s.get("stage_s"), "wall_s": s["wall_s"],
                               "checkpoint": s["artifacts"]["checkpoint"], "cached": cached_in(s)}
                              for s in result["rounds"]])
        # the final model's answers prompt by prompt, so later runs can be compared with this one head to head
        # (--versus) from the result files alone, after the work dir is gone; a miss here does not fail the run
        try:
            record["final_ifeval"] = compact_ifeval(final_ifeval_table(record, Path(cfg.round.run.work_dir)))
        except (FileNotFoundError, KeyError) as e:
            record["final_ifeval_error"] = str(e)
    except Exception as e:  # noqa: BLE001  (a failed recipe is a row of the sweep table too)
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    record["total_wall_s"] = time.perf_counter() - t0
    record["load_avg_end"] = _load_avg()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{label}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return record


def cached_in(round_summary: dict) -> list[str]:
    """The stages of a round that were cache hits (content-addressed results of an earlier run in the same work dir,
    e.g. round 1's collect when another method already sampled the same starting model with the same seed): their
    time is not in the round's wall time, so a run's "rounds min" is only comparable with a fresh run's when the
    table says what it skipped."""
    return [st["stage"] for st in round_summary.get("cost", {}).get("stages", []) if st.get("cached")]


# Stages that are cheap and deterministic (the prompt sets): a hit on them changes no wall time worth counting.
_CHEAP = ("prompts-",)


def cache_hits(record: dict) -> str:
    """The heavy stages a run's rounds took from the cache, counted over the rounds ("collect 1, annotate 1"); "none"
    when every heavy stage ran; "not recorded" for result files written before the rounds carried the list."""
    if any("cached" not in r for r in record.get("rounds", [])) or not record.get("rounds"):
        return "not recorded"
    counts: dict[str, int] = {}
    for r in record["rounds"]:
        for stage in r["cached"]:
            if not stage.startswith(_CHEAP):
                counts[stage] = counts.get(stage, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _ci(p: dict | None) -> str:
    if not p:
        return ""
    return f"{p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"


def table(results: Path) -> str:
    rows = []
    for f in sorted(results.glob("*.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(f.read_text())
        c = r["config"]["round"]
        row = {"label": r["label"], "status": r["status"], "rounds": r["config"]["rounds"],
               "prompts/round": c["prompts"]["n_train"], "K": c["collect"]["k"],
               "max_tokens": c["collect"]["max_tokens"], "lr": c["train"]["learning_rate"],
               "epochs": c["train"]["epochs"], "beta": c["train"]["beta"], "loss": c["train"]["loss"],
               "overrides": " ".join(r["overrides"])}
        if r["status"] == "ok":
            p = r["paired"]
            row.update({
                "IFEval prompt strict": f"{r['before']['ifeval.prompt_level_strict']:.3f} -> "
                                        f"{r['after']['ifeval.prompt_level_strict']:.3f}",
                "Δ (95% CI)": _ci(p.get("ifeval.prompt_level_strict")),
                "McNemar p": f"{p['ifeval.prompt_level_strict']['p_value']:.3g}",
                "held-out strict Δ (95% CI)": _ci(p.get("pass_rate_strict")),
                "truncated": f"{r['before']['ifeval.truncated_share']:.2f} -> {r['after']['ifeval.truncated_share']:.2f}",
                "pairs": "/".join(str(x["pairs"]["n_pairs"]) for x in r["rounds"]),
                "rounds min": f"{r['rounds_wall_s'] / 60:.1f}",
                "cache hits in the rounds": cache_hits(r),
                "load": f"{r['load_avg_start']:.1f}"})
        else:
            row["Δ (95% CI)"] = r["error"][:80]
        rows.append(row)
    cols = ["label", "status", "rounds", "prompts/round", "K", "max_tokens", "lr", "epochs", "beta", "loss",
            "overrides", "IFEval prompt strict", "Δ (95% CI)", "McNemar p", "held-out strict Δ (95% CI)", "truncated",
            "pairs", "rounds min", "cache hits in the rounds", "load"]
    return md_table(rows, cols)


def method_of(round_config: dict) -> str | None:
    """The bench.methods.METHODS entry a round config is (the most specific one whose switches all match), or None."""
    from bench.methods import METHODS

    def value(path: str):
        node = round_config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    matches = [(len(sw), name) for name, sw in METHODS.items()
               if all(str(value(k)) == str(v) for k, v in sw.items())]
    return max(matches)[1] if matches else None


def _share(r: dict) -> str:
    """The share of the final model's IFEval answers cut at the token limit (the looping the recipe can grow)."""
    v = r.get("after", {}).get("ifeval.truncated_share")
    return "" if v is None else f"{v:.0%}"


def _wall(r: dict, short: bool = False) -> str:
    """The rounds' wall time and the CPU it ran on: rounds take ~1.4x longer on one 2-core cloud CPU than another,
    so a time without its machine cannot be compared. ``short`` keeps the CPU's last word (Xeon, EPYC)."""
    if r.get("rounds_wall_s") is None:
        return ""
    cpu = ((r.get("machine") or {}).get("cpu") or "").replace("(R)", "").replace(" Processor", "")
    if short and cpu:
        cpu = cpu.split()[-1]
    return f"{r['rounds_wall_s'] / 60:.1f}" + (f" ({cpu})" if cpu else "")


def method_rows(results: Path, config_file: str = "configs/ifeval_campaign.yaml") -> list[dict]:
    """One row per method and setting over the six-round runs of ``config_file``: every seed's IFEval prompt-strict
    delta with its paired CI, and across seeds the mean delta with a t-interval (n >= 2 seeds; the spread of seeds,
    which the per-run CIs do not include). A run that overrides a lever beyond the seeds, the method's switches and
    the registered model's name (SPPO settled at ``train.learning_rate=5e-6 train.epochs=1``) is its own row, named
    by those overrides: runs at different settings are never averaged together."""
    from scipy import stats

    from bench.methods import METHODS

    ignored = {"rounds", "round.prompts.seed", "round.collect.seed", "round.train.seed", "round.run.registered_model"}
    by: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(results.glob("*.json")):
        r = json.loads(f.read_text())
        name = method_of(r["config"]["round"])
        if r.get("status") != "ok" or not r.get("config_file", "").endswith(config_file) or name is None:
            continue
        if r["config"]["rounds"] != 6:
            continue
        switches = ignored | {f"round.{k}" for k in METHODS[name]}
        extra = sorted(o.removeprefix("round.") for o in r.get("overrides", []) if o.split("=", 1)[0] not in switches)
        by.setdefault((name, " ".join(extra)), []).append(r)
    rows = []
    order = list(METHODS)
    for name, setting in sorted(by, key=lambda k: (order.index(k[0]), k[1])):
        runs = sorted(by[(name, setting)], key=lambda r: r["config"]["round"]["train"]["seed"])
        d = [r["paired"]["ifeval.prompt_level_strict"]["delta"] for r in runs]
        # each seed's cells, once: the long form joins them per column, the compact (README) form puts seeds in columns
        by_seed = {r["config"]["round"]["train"]["seed"]: {
            "delta": _ci(r["paired"]["ifeval.prompt_level_strict"]),
            "held_out": f"{r['paired']['pass_rate_strict']['delta']:+.2f}", "limit": _share(r), "wall": _wall(r),
            "wall_short": _wall(r, short=True)} for r in runs}
        row = {"method": f"{name} ({setting})" if setting else name, "seeds": len(runs),
               "per seed: IFEval prompt strict Δ (95% CI)": "; ".join(f"seed {s}: {c['delta']}"
                                                                       for s, c in by_seed.items()),
               **{col: "; ".join(c[key] for c in by_seed.values()) for key, col in (
                   ("held_out", "held-out Δ per seed"), ("limit", "IFEval answers at the limit after, per seed"),
                   ("wall", "rounds' wall min per seed (machine)"))},
               "mean Δ": f"{sum(d) / len(d):+.3f}",
               "runs": ", ".join(r["label"] for r in runs),
               "by_seed": by_seed}
        if len(d) >= 2:
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
            row["95% t-interval over seeds"] = f"[{lo:+.3f}, {hi:+.3f}]"
        rows.append(row)
    return rows


def compact_methods_table(rows: list[dict]) -> str:
    """The per-method table in the README's form: one column per seed (the paired IFEval delta with its CI), the mean
    with its t-interval in one cell, and the per-seed held-out delta, share at the token limit and rounds' wall time
    each in one cell, in seed order. A seed a method has no run for says "not run"."""
    seeds = sorted({s for r in rows for s in r["by_seed"]})
    out = []
    for r in rows:
        by = r["by_seed"]
        row = {"method": r["method"], **{f"seed {s}": by[s]["delta"] if s in by else "not run" for s in seeds},
               "mean, 95% t-interval over seeds": r["mean Δ"] + (f" {r['95% t-interval over seeds']}"
                                                                if "95% t-interval over seeds" in r else "")}
        for key, col in (("held_out", "held-out Δ per seed"), ("limit", "at the limit after"),
                         ("wall_short", "rounds' wall (min)")):
            row[col] = ", ".join(by[s][key] for s in sorted(by))
        out.append(row)
    return md_table(out, ["method", *(f"seed {s}" for s in seeds), "mean, 95% t-interval over seeds",
                          "held-out Δ per seed", "at the limit after", "rounds' wall (min)"])


def compact_ifeval(scored) -> dict[str, list]:
    """A scored IFEval table as JSON-ready columns: prompt keys, the prompt-level verdicts, the per-instruction ones."""
    return {"key": [str(k) for k in scored["key"]],
            **{c: [bool(x) for x in scored[c]] for c in ("strict_all", "loose_all")},
            **{c: [[bool(x) for x in f] for f in scored[c]] for c in ("strict_follow", "loose_follow")}}


def final_ifeval_table(record: dict, work_dir: Path | None):
    """The scored IFEval table of a run's last checkpoint: from its result file when it carries one, else found in
    the campaign's artifact store by the model's content hash (the manifest records it), so two runs' answers can be
    compared prompt by prompt."""
    import pandas as pd

    if record.get("final_ifeval"):
        return pd.DataFrame(record["final_ifeval"])
    if work_dir is None:
        raise FileNotFoundError(f"{record['label']}: its result file has no per-prompt IFEval table; pass the "
                                f"campaign's work dir with --work-dir")
    sha = record["rounds"][-1]["checkpoint"]
    for manifest in sorted((work_dir / "artifacts" / "ifeval").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("model", {}).get("sha256") == sha:
            return pd.read_parquet(manifest.parent / "data.parquet")
    raise FileNotFoundError(f"{record['label']}: no IFEval artifact of its final checkpoint {sha[:12]} under "
                            f"{work_dir / 'artifacts' / 'ifeval'} (pass the campaign's work dir with --work-dir)")


def versus(results: Path, label_a: str, label_b: str, work_dir: Path | None) -> dict:
    """IFEval metrics of run B's final model minus run A's, paired over the same 541 prompts (bootstrap CI, McNemar):
    a head-to-head of two methods that does not go through their (shared) starting point."""
    from pipeline_lib.evaluation.ifeval import paired_ifeval

    a, b = (json.loads((results / f"{x}.json").read_text()) for x in (label_a, label_b))
    return paired_ifeval(final_ifeval_table(a, work_dir), final_ifeval_table(b, work_dir))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="campaign YAML")
    ap.add_argument("--label", help="name of the result file")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the table of every result in --results")
    ap.add_argument("--methods-table", action="store_true", help="print the recipe's runs grouped by method")
    ap.add_argument("--compact", action="store_true", help="with --methods-table: the README's form, one column per "
                    "seed (the labels of the runs are left out)")
    ap.add_argument("--method", help="a bench.methods.METHODS entry: its switches as round.* overrides")
    ap.add_argument("--versus", nargs=2, metavar=("LABEL_A", "LABEL_B"), help="B's final model minus A's, on IFEval")
    ap.add_argument("--work-dir", type=Path, default=Path("runs/ifeval-campaign"), help="with --versus, for result "
                    "files without a per-prompt table: the campaigns' work dir (their artifact store)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.compact and not a.methods_table:
        ap.error("--compact is a form of --methods-table: pass both")
    if a.table:
        print(table(a.results))
        return
    if a.methods_table and a.compact:
        print(compact_methods_table(method_rows(a.results)))
        return
    if a.methods_table:
        print(md_table(method_rows(a.results), ["method", "seeds", "per seed: IFEval prompt strict Δ (95% CI)",
                                                "mean Δ", "95% t-interval over seeds", "held-out Δ per seed",
                                                "IFEval answers at the limit after, per seed",
                                                "rounds' wall min per seed (machine)", "runs"]))
        return
    if a.versus:
        out = versus(a.results, *a.versus, a.work_dir)
        print(json.dumps({k: {m: v[m] for m in ("before", "after", "delta", "ci_low", "ci_high", "p_value",
                                                 "n_gained", "n_lost") if m in v} for k, v in out.items()}, indent=1))
        return
    if a.method:
        from bench.methods import METHODS

        if a.method not in METHODS:
            ap.error(f"--method {a.method}: expected one of {sorted(METHODS)}")
        a.overrides = [f"round.{k}={v}" for k, v in METHODS[a.method].items()] + list(a.overrides)
    if not a.config or not a.label:
        ap.error("--config and --label are required (or --table)")
    r = run(a.config, a.label, a.overrides, a.results)
    print(json.dumps({k: r.get(k) for k in ("label", "status", "rounds_wall_s", "error")}, default=str))
    if r["status"] == "ok":
        print(table(a.results))


if __name__ == "__main__":
    main()
