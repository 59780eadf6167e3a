"""The package's structure: no import cycle anywhere (imports inside functions included), the data
layer below the models, one owner of the workdir and of Orbax managers, flags only in main.py,
and test files that share code only through tests/helpers.py."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "influence_jax"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `path` imports anywhere in its body (functions included)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a non-module attribute
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    graph = _graph()
    assert "influence_jax.scoring" in graph and graph["influence_jax.ranking.batch"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_layers():
    graph = _graph()
    # The data pipeline never imports model code or anything above it.
    above_data = {"influence_jax.models", "influence_jax.engine", "influence_jax.train"}
    for name in graph:
        if name.startswith("influence_jax.data"):
            assert not _reaches(graph, name) & above_data, name
    # The read side sits below its users: scoring imports none of ranking, influence, training.
    users = {"influence_jax.ranking", "influence_jax.influence", "influence_jax.train",
             "influence_jax.evaluation", "influence_jax.loop"}  # fmt: skip
    assert not _reaches(graph, "influence_jax.scoring") & users
    assert not _reaches(graph, "influence_jax.influence") & {"influence_jax.ranking"}


def _sources() -> list[Path]:
    return [p for d in ("influence_jax", "tools") for p in sorted((ROOT / d).rglob("*.py"))]


def test_one_owner_of_checkpoints_and_the_workdir_layout():
    owners = {"CheckpointManager(": set(), '"best.json"': set(), '"checkpoints"': set(),
              '"config.json"': set()}  # fmt: skip
    for path in _sources():
        text = path.read_text()
        for needle, found in owners.items():
            if needle in text:
                found.add(path.relative_to(ROOT).as_posix())
    for needle, found in owners.items():
        assert found == {"influence_jax/checkpoint.py"}, (needle, found)


def test_library_modules_define_and_read_no_flags():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path.name != "main.py":
            assert not re.search(r"DEFINE_\w+\(|FLAGS\.\w", text), path


def test_test_files_share_code_only_through_helpers():
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests"):
                assert node.module in ("tests", "tests.helpers"), (path.name, node.module)
                if node.module == "tests":
                    assert [a.name for a in node.names] == ["helpers"], path.name
    assert os.path.exists(ROOT / "tests" / "helpers.py")


def test_sources_are_named_in_one_registry():
    """A new source is a reader and one entry in data/sources.py: no tool or module names one."""
    from influence_jax.data import readers

    names = sorted(readers.SOURCES)
    assert names == ["events", "movielens", "retailrocket", "taobao"]
    for path in _sources():
        if path.name == "sources.py":
            continue
        text = path.read_text()
        for name in ("movielens", "retailrocket", "taobao"):  # "events" is an ordinary word too
            assert f'"{name}"' not in text, (path, name)
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--helpfull"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    ).stdout  # fmt: skip
    assert f"<{'|'.join(names)}>" in help_text
