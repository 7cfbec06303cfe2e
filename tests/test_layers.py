"""Imports run one way: every module of vaemo sits in a layer and imports only from its own or lower layers,
and no chain of imports (those inside functions included) comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Lowest first. A module belongs to the first layer with a matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("vaemo", "vaemo.errors", "vaemo.args", "vaemo.progress", "vaemo.plotting", "vaemo.config")),
    ("data", ("vaemo.data",)),
    ("model and losses", ("vaemo.model", "vaemo.losses")),
    (
        "stage logic, scoring, Ray plumbing",
        ("vaemo.train.objectives", "vaemo.cache_fingerprint", "vaemo.eval.scoring", "vaemo.eval.report", "vaemo.cluster"),
    ),
    (
        "runs: training, evaluation, caches, sweeps",
        ("vaemo.train", "vaemo.eval", "vaemo.teacher_cache", "vaemo.tune", "vaemo.asha"),
    ),
    ("pipelines", ("vaemo.demo", "vaemo.science")),
    ("command line", ("vaemo.cli",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "vaemo" and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def import_graph() -> dict[str, set[str]]:
    """module -> the vaemo modules it imports anywhere in its body (functions included)."""
    paths = {module_name(p): p for p in (ROOT / "vaemo").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_every_import_points_down_or_sideways():
    graph = import_graph()
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if b != "vaemo" and layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for():
    """An upward import and a circle, planted in a graph, are found."""
    graph = {"vaemo.data.stream": {"vaemo.data.decode"}, "vaemo.data.decode": {"vaemo.data.stream"}, "vaemo.config": set()}
    assert find_cycle(graph)[0] == find_cycle(graph)[-1]
    assert layer_of("vaemo.data.stream") > layer_of("vaemo.config")
    assert layer_of("vaemo.cli") > layer_of("vaemo.train.launch") > layer_of("vaemo.train.objectives")


def test_the_synthetic_worlds_words_reach_only_the_synthetic_world_and_the_tiny_tokenizer():
    """vaemo.data.vocab (the synthetic world's shapes, emotions, questions) is read by its generator and by the
    tiny preset's tokenizer alone: a stage or the scorer that used it would ask a user's clips its questions
    (stage 0 did, until it took its questions from the config)."""
    readers = sorted(name for name, targets in import_graph().items() if "vaemo.data.vocab" in targets)
    assert readers == ["vaemo.data.synth", "vaemo.model.build"], readers
