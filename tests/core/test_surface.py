"""The declared core surface (``rfdetr_core.__all__``): every name it lists resolves, and rfdetr-train,
rfdetr-export and rfdetr-serve import nothing else from core (issue 13, item 9)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import rfdetr_core

ROOT = Path(__file__).parents[2]
SIBLINGS = (
    "rfdetr-train/src/rfdetr_train",
    "rfdetr-export/src/rfdetr_export",
    "rfdetr-serve/src/rfdetr_serve",
)


def _core_imports():
    """``(file, module, name)`` of every ``from rfdetr_core[.x] import name`` in the sibling packages."""
    for pkg in SIBLINGS:
        for path in sorted((ROOT / "packages" / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and node.module.split(".")[0] == "rfdetr_core"
                ):
                    for alias in node.names:
                        yield path.relative_to(ROOT), node.module, alias.name


def test_declared_names_resolve():
    for name in rfdetr_core.__all__:
        assert getattr(rfdetr_core, name) is not None, name


def test_siblings_import_only_declared_names():
    found = list(_core_imports())
    assert found, "the scan found no imports of rfdetr_core at all"
    undeclared = [f"{f}: from {m} import {n}" for f, m, n in found if n not in rfdetr_core.__all__]
    assert not undeclared, "not in rfdetr_core.__all__:\n" + "\n".join(undeclared)
    # the name imported from a submodule is the declared object, not a namesake
    # (a lazy name's home module, not ``getattr(rfdetr_core, name)``: once ``rfdetr_core.preprocess`` the module
    # is imported, Python binds it as the package attribute of that name, shadowing the function)
    for f, module, name in found:
        home = rfdetr_core._LAZY.get(name)
        declared = getattr(importlib.import_module(home), name) if home else getattr(rfdetr_core, name)
        assert getattr(importlib.import_module(module), name) is declared, (f, module, name)
