"""The package's layers import one way: a module imports its own package or a lower layer.

    kernels, config  <-  model  <-  rewards, data  <-  training  <-  finetune, rl  <-  recipes

Packages on one layer do not import each other. Lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("kernels", "config"),
    ("model",),
    ("rewards", "data"),
    ("training",),
    ("finetune", "rl"),
    ("recipes",),
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def moetune_imports(path: Path):
    """(line, imported package) for every `moetune.PACKAGE` the module at `path` imports."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = (
                [node.module]
                if node.module != "moetune"
                else [f"moetune.{alias.name}" for alias in node.names]
            )
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "moetune" and len(parts) > 1:
                yield node.lineno, parts[1]


def upward_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, imported in moetune_imports(path):
            if imported != package and RANK.get(imported, len(LAYERS)) >= RANK[package]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports moetune.{imported}")
    return found


def test_every_package_has_a_layer():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(RANK)


@pytest.mark.parametrize("package", sorted(RANK))
def test_no_upward_imports(package):
    assert upward_imports(package) == []


def test_an_upward_import_is_named_by_file_and_line(tmp_path):
    module = tmp_path / "loose.py"
    module.write_text("import torch\n\n\ndef f():\n    from moetune.recipes import loader\n")
    assert list(moetune_imports(module)) == [(5, "recipes")]
