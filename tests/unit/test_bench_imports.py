"""Every benchmark module imports: benchmarks are not run by the suite, so a module-level error (a decorator's
arguments, a moved import) would otherwise surface only when someone runs ``make bench``."""

import importlib
from pathlib import Path

import pytest

BENCH = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCH)
def test_bench_module_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None)) or name in {"common", "local_ray"}, (
        f"bench.{name} has no main()")
