"""The package's imports go one way: no module imports one that (directly or not) imports it,
and each layer imports only the layers below it. Imports inside functions count too: a cycle
hidden in a function is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fuselm"

# Bottom to top. A component (a top-level module or subpackage of fuselm) may import its own
# modules and any component of an earlier layer; `fuselm/__init__.py` (the package's face) may
# import anything and nothing imports it.
LAYERS = [
    ["_version", "errors", "cancel", "conventions"],
    ["files", "registry", "progress"],
    ["engines"],  # below config: a model entry's `engine:` choices come from its registry
    ["config"],
    ["text"],
    ["sampling"],
    ["result"],
    ["models"],
    ["router"],
    ["fusion"],
    ["calibration"],
    ["resolve"],
    ["eval"],
    ["training"],
    ["viz"],
    ["serve"],
    ["cli"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the fuselm modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "fuselm")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "fuselm":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if _is_module(sub) else target)
        graph[name] = {e for e in edges if e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 40
    # the eval command imports the evaluation runs inside a function only
    assert "fuselm.eval.sweep" in graph["fuselm.cli.eval"]


def test_no_module_import_cycle():
    assert _cycles(import_graph()) == []


def test_no_package_import_cycle():
    graph = import_graph()
    components: dict[str, set[str]] = {}
    for module, edges in graph.items():
        components.setdefault(_component(module), set()).update(_component(e) for e in edges)
    for c in components:
        components[c].discard(c)
    assert _cycles(components) == []


def test_each_layer_imports_only_layers_below():
    graph = import_graph()
    unranked = sorted({_component(m) for m in graph} - set(RANK) - {""})
    assert unranked == [], f"components missing from LAYERS: {unranked}"
    wrong = []
    for module, edges in graph.items():
        here = _component(module)
        for e in edges:
            there = _component(e)
            if here == "":  # the package's face
                continue
            if there == "":
                wrong.append(f"{module} imports the package's face ({e})")
            elif there != here and RANK[there] >= RANK[here]:
                wrong.append(f"{module} ({here}) imports {e} ({there})")
    assert wrong == []
