"""The package's shape: imports go one way (no module imports, even inside a function, a module that imports
it, or a module of a higher layer: library < run < study < cli), the top level holds the packages and a few
small modules, no two modules share a file name, and each test file is named for the module it tests."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_kvasir"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ssl_kvasir module that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c when c is a module.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: a package's own __init__ is not an edge back.
    return {
        name: {m for m in _imports(path, modules) if not name.startswith(m + ".") and m != name}
        for name, path in files.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle (a list of modules, first = last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circle_in_the_package():
    graph = _graph()
    assert "ssl_kvasir.run.train" in graph["ssl_kvasir.cli"] or any(
        "ssl_kvasir.run" in m for m in graph["ssl_kvasir.cli"]
    )
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


LAYERS = {"run": 1, "study": 2, "cli": 3}
"""The layers above the library (every other module: data, models, methods, analysis, files, names, ...)."""


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_no_import_runs_up_a_layer():
    """library < run < study < cli: a module imports its own layer and the layers below, never one above."""
    graph = _graph()
    assert {_layer(m) for m in graph} == {0, 1, 2, 3}
    upward = sorted(f"{m} -> {i}" for m, imports in graph.items() for i in imports if _layer(i) > _layer(m))
    assert upward == []


def test_the_layer_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ssl_kvasir.study.sweeps import plan\n")
    assert _imports(module, {"ssl_kvasir.study.sweeps"}) == {"ssl_kvasir.study.sweeps"}
    assert _layer("ssl_kvasir.study.sweeps") > _layer("ssl_kvasir.run.train") > _layer("ssl_kvasir.names")


MAX_TOP_LEVEL_MODULES = 9
MAX_TOP_LEVEL_LINES = 600
"""A top-level module is small; one that grows past this becomes a package."""


def test_the_top_level_holds_the_packages_and_a_few_small_modules():
    modules = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, [p.name for p in modules]
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in modules}
    assert {name: n for name, n in sizes.items() if n > MAX_TOP_LEVEL_LINES} == {}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert {"data", "models", "pseudo_labels", "methods", "analysis", "run", "study"} <= packages


def test_library_layers_do_not_import_the_run_layer():
    graph = _graph()
    below = [
        m
        for m in graph
        if m.split(".")[1:2] in (["data"], ["models"], ["methods"], ["analysis"], ["pseudo_labels"])
    ]
    assert below
    assert {m: sorted(i for i in graph[m] if i.startswith("ssl_kvasir.run")) for m in below} == {
        m: [] for m in below
    }


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [name for name, n in names.items() if n > 1] == []


TESTS = Path(__file__).resolve().parent

NOT_ONE_MODULE = {
    "test_layout.py": "the package's shape",
    "methods/test_registry.py": "ssl_kvasir/methods/__init__.py (METHODS: what every registered method shares)",
    "bench/test_harness.py": "bench/harness.py (the benchmarks' own helpers)",
}
"""The test files that test no single module of the package, and what each tests instead."""


def test_each_test_file_is_named_for_the_module_it_tests():
    """``tests/<package>/test_<module>.py`` tests ``ssl_kvasir/<package>/<module>.py`` (or a subpackage)."""
    unnamed = []
    for path in sorted(TESTS.rglob("test_*.py")):
        relative = path.relative_to(TESTS)
        target = PACKAGE.joinpath(*relative.parent.parts, relative.stem.removeprefix("test_"))
        if not (target.with_suffix(".py").exists() or target.is_dir()):
            unnamed.append(relative.as_posix())
    assert unnamed == sorted(NOT_ONE_MODULE)
