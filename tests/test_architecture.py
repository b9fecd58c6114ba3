"""The shape of the package: no import circles, and the README's config reference is the schema's.

The import layers themselves are import-linter's contract in pyproject.toml, checked by `lint-imports` in .ci/run.
"""

from __future__ import annotations

from pathlib import Path

import grimp

from lorafit.config import reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def import_cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_circles():
    """Function-level imports count too: grimp reads every import statement, wherever it is."""
    graph = grimp.build_graph("lorafit")
    assert len(graph.modules) > 30
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}

        def find_modules_directly_imported_by(self, m):
            return {"a": {"b"}, "b": {"a"}, "c": set()}[m]

    assert import_cycles(Graph()) == [["a", "b"]]


def test_readme_config_reference_is_current():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    text = README.read_text(encoding="utf-8")
    assert start in text and end in text, "README.md lost its config-reference markers"
    section = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
    assert section == reference_markdown(), "README.md's config reference is stale: run scripts/sync-readme-keys"
