"""The package's shape: no import cycle (lazy imports included), every module listed in the
README's layout section, and the `python -m` names users type still working."""
import ast
import pathlib
import re

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "blip2_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name):  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {owner(t) for t in targets if t.startswith("blip2_jax")} - {m, ""}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle():
    graph = _import_graph()
    assert graph["blip2_jax.serving"], "the graph is empty: the parser found no imports"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    section = section[:section.index("\n## ", 3)]
    missing = []
    for name, f in _modules().items():
        rel = f.relative_to(PACKAGE)
        if f.name in ("__init__.py", "__main__.py") and len(rel.parts) > 1:
            continue
        if "builders" in rel.parts or "metrics" in rel.parts:  # listed as folders
            continue
        if not re.search(rf"(?<![\w/]){re.escape(f.name)}", section):
            missing.append(str(rel))
    assert not missing, f"README layout misses: {missing}"


@pytest.mark.parametrize("name", ["generate", "score", "match", "retrieve", "evaluate"])
def test_public_entry_points_are_aliases_of_cli(name):
    alias = (PACKAGE / f"{name}.py").read_text()
    assert f"blip2_jax.cli.{name}" in alias and len(alias.splitlines()) <= 8
    assert (PACKAGE / "cli" / f"{name}.py").exists()
