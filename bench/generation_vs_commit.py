"""The collect stage's generation at an older commit against this tree's, on this machine, in one run.

Why: a tokens/s figure from another day is not a baseline. Machines here differ by 2x from one day to the next (the
2026-11-23 figure of 264 tokens/s and a 2026-12-05 run of the same code on the same kind of machine, 372-423), so
"2x the old figure" can only be judged against the old code measured beside the new. This checks out ``--commit``
into a temporary git worktree and runs its ``bench.generation.vllm_collect`` and this tree's, interleaved
(``--repeats`` rounds, each side once a round, the order rotated by one each round so that no side always runs
first: the first vLLM process of a run was 10-20% slower than the ones after it, 2026-12-06, after ``--warmup``
discarded runs of this tree's default side; the cause was vLLM compiling its token-rank helper on an empty Inductor
cache, which a tree from before cpu_ranks.py still does in its first process), each in its own process, on the same
prompt token ids (this tree's builtin generator, seed 0), with the same sampling (K samples at T = 1, top-p 1, engine seed 0). Both trees use this
interpreter's packages. Reported: generated tokens/s per side and repeat, the mean, the ratio to the old commit's
mean, and each mean as a fraction of the compute roofline (2 N FLOPs a token over the bf16 matmul peak, measured at
the start and the end of the run).
Run: python -m bench.generation_vs_commit --commit 0f71b7a [--repeats 2] [--variant compiled='{"enforce_eager": false}']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, matmul_peak_tflops, md_table, save

ROOT = Path(__file__).resolve().parents[1]

# run inside the side's own tree: only the tree's own vllm_collect decides how the stage generates
SIDE = """
import json, sys
from bench.generation import vllm_collect
from pipeline_lib.models import resolve
ids = json.load(open(sys.argv[1]))
args = json.loads(sys.argv[2])
m = resolve(args["model"])
extra = (args["name"], args["engine_args"]) if args["engine_args"] else ()
print("RESULT " + json.dumps(vllm_collect(m.path, ids, args["k"], args["max_tokens"], *extra)))
"""


def run_side(tree: Path, ids_file: Path, args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", SIDE, str(ids_file), json.dumps(args)], cwd=tree, env=env,
                       capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{args['name']} in {tree} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rotated(sides: list, rep: int) -> list:
    """The order of round ``rep``: the sides shifted left by ``rep`` places (round 0 keeps the given order)."""
    k = rep % len(sides)
    return sides[k:] + sides[:k]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", required=True, help="the older commit to measure beside this tree")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of this tree's default side first")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON engine arguments for this tree's side")
    a = ap.parse_args(argv)
    from bench.generation import bench_prompt_ids, matmul_params

    variants = dict(v.split("=", 1) for v in a.variant)
    m, ids = bench_prompt_ids(a.model, a.prompts)
    head = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    common = {"model": a.model, "k": a.k, "max_tokens": a.max_tokens, "engine_args": None}
    sides = [(f"{a.commit} (its default)", None, {}), (f"{head} (this tree, default)", ROOT, {})]
    sides += [(f"{head} {name}", ROOT, json.loads(spec)) for name, spec in variants.items()]
    peaks, rows = [matmul_peak_tflops()], []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), a.commit], check=True,
                       capture_output=True)
        try:
            ids_file = Path(tmp) / "ids.json"
            ids_file.write_text(json.dumps(ids))
            for i in range(a.warmup):
                r = run_side(ROOT, ids_file, {**common, "name": "warm-up"})
                print(f"warm-up #{i} (not counted): {r['tokens_per_s']:.1f} tokens/s", flush=True)
            for rep in range(a.repeats):
                for label, tree, engine_args in rotated(sides, rep):
                    r = run_side(tree or old, ids_file, {**common, "name": label, "engine_args": engine_args})
                    rows.append({"side": label, "repeat": rep, "started": time.strftime("%H:%M:%S"), **r})
                    print(f"{label} #{rep}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    peaks.append(matmul_peak_tflops())
    n = matmul_params(m.path)
    roofline = min(peaks) * 1e12 / (2 * n)
    means = {label: sum(r["tokens_per_s"] for r in rows if r["side"] == label) / a.repeats for label, _, _ in sides}
    base = means[sides[0][0]]
    summary = [{"side": label, "tokens/s per repeat": ", ".join(f"{r['tokens_per_s']:.0f}" for r in rows
                                                                 if r["side"] == label),
                "mean tokens/s": round(mean, 1), "vs old commit": f"{mean / base:.2f}x",
                "compute roofline share": f"{mean / roofline:.1%}",
                "engine start s": ", ".join(f"{r['load_s']:.1f}" for r in rows if r["side"] == label)}
               for label, mean in means.items()]
    result = {"bench": "generation_vs_commit", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "settings": vars(a), "head": head, "matmul_params": n, "peak_bf16_tflops": peaks,
              "compute_roofline_tok_s": roofline, "rows": rows, "summary": summary, "load_avg": os.getloadavg()}
    save("generation_vs_commit", result)
    print(md_table(summary, list(summary[0])))
    return result


if __name__ == "__main__":
    main()
