"""Shared helpers for benchmarks: machine facts, peak RSS, the bf16 matmul peak, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

# BENCH_RESULTS_DIR redirects the JSON files (e.g. to $OUT on a lent GPU machine)
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    try:
        cpu = [l for l in open("/proc/cpuinfo") if l.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_gib(children: bool = False) -> float:
    """Peak resident set size (ru_maxrss is KiB on Linux) of this process, or of its waited-for children."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20


def matmul_peak_tflops(dtype_name: str = "bfloat16", n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul throughput (TFLOP/s) on this machine, the denominator of MFU (8192 x 50 on a GPU)."""
    import torch

    from pipeline_lib.cost.meter import measure_matmul_tflops

    return measure_matmul_tflops(dtype_name, *((8192, 50) if torch.cuda.is_available() else (n, reps)))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
