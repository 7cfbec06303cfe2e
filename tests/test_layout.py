"""Imports run one way: data < model < (losses) < train / eval < cli, jobs. Checked on the source with ast."""

from __future__ import annotations

import ast

from conftest import ROOT

# What each layer may import from vaemo (besides itself); anything not named is forbidden.
ALLOWED = {
    "vaemo/data/": ("vaemo.data", "vaemo.errors", "vaemo.config", "vaemo.progress"),
    "vaemo/model/": ("vaemo.model", "vaemo.data", "vaemo.errors", "vaemo.config", "vaemo.losses"),
    "vaemo/losses.py": (),
}


def vaemo_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "vaemo":  # from vaemo import progress
            names.update(f"vaemo.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaemo"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("vaemo"))
    return names


def test_nothing_in_the_package_imports_the_command_line():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in vaemo_imports(p) if n == "vaemo.cli")
        for p in (ROOT / "vaemo").rglob("*.py")
        if p.name != "cli.py" or p.parent.name != "vaemo"
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_lower_layers_import_only_lower_layers():
    problems = {}
    for prefix, allowed in ALLOWED.items():
        files = [ROOT / prefix] if prefix.endswith(".py") else list((ROOT / prefix).rglob("*.py"))
        for path in files:
            bad = sorted(n for n in vaemo_imports(path) if not n.startswith(allowed) or not allowed)
            if bad:
                problems[str(path.relative_to(ROOT))] = bad
    assert not problems, problems
