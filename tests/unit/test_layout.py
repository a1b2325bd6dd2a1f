"""The house's shape (issue 17), read from the source with ``ast``: no import cycles, lazy imports included; only the
command line imports the orchestration (``flows``, ``tasks``); no stage imports the round config; every stage module
has one entry function ``run``, which its task calls."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline_lib", "tasks", "flows")
STAGES = ["prompts", "collect", "annotate", "pair", "dataset_pairs", "hybrid_prompts", "hybrid_candidates",
          "hybrid_pair", "train", "evaluate"]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (functions included; ``TYPE_CHECKING`` blocks
    excluded, they never run)."""
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}".rstrip(".")
                targets = [f"{base}.{a.name}" for a in child.names]
            else:
                targets = []
            found.update(t for t in map(resolve, targets) if t and t != name)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles_lazy_imports_included():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above is not vacuous: a -> b -> c -> a and d -> a give one cycle of three."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_command_line_imports_flows_and_tasks():
    graph = _graph()
    library = [m for m in graph if m.startswith("pipeline_lib") and m != "pipeline_lib.cli"
               and not m.startswith("pipeline_lib.commands")]
    reaching_up = {m: sorted(t for t in graph[m] if t.split(".")[0] in ("flows", "tasks")) for m in library}
    assert {m: t for m, t in reaching_up.items() if t} == {}


def test_no_stage_imports_the_round_config():
    graph = _graph()
    stages = {m: graph[m] for m in graph if m.startswith("pipeline_lib.stages")}
    assert {m for m, targets in stages.items() if "pipeline_lib.config" in targets} == set()


def test_every_stage_has_one_entry_that_its_task_calls():
    """``pipeline_lib/stages/<stage>`` defines ``run``; ``tasks/stages.py`` calls ``<stage>.run`` in the task of that
    stage (``<stage>_task``)."""
    modules = _modules()
    tree = ast.parse((REPO / "tasks" / "stages.py").read_text())
    calls = {}
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run" \
                    and isinstance(node.func.value, ast.Name):
                calls[node.func.value.id] = fn.name
    for stage in STAGES:
        body = ast.parse(modules[f"pipeline_lib.stages.{stage}"].read_text()).body
        assert "run" in {n.name for n in body if isinstance(n, ast.FunctionDef)}, stage
        assert calls.get(stage) == f"{stage}_task", stage
