"""Structure: the network under ``rfdetr_core/models/`` imports only torch and the standard library.

Variants, weights, errors and everything else of core map onto the network from outside
(``rfdetr_core.factory``); the scan covers every import statement, including those inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import rfdetr_core.models

MODELS_DIR = Path(rfdetr_core.models.__file__).parent


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # a relative import stays inside the package: name it as the absolute module it reaches
            found.append((node.lineno, "rfdetr_core.models" if node.level == 1 else (node.module or "")))
            if node.level > 1:
                found[-1] = (node.lineno, "." * node.level + (node.module or ""))
    return found


def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top == "torch"
        or top in sys.stdlib_module_names
        or module == "rfdetr_core.models"
        or module.startswith("rfdetr_core.models.")
    )


def test_models_import_only_torch_and_the_standard_library():
    files = sorted(MODELS_DIR.rglob("*.py"))
    assert len(files) >= 7  # the scan sees the package (detector, backbone, ..., spec)
    bad = [
        f"{path.relative_to(MODELS_DIR.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)))
        if not _allowed(module)
    ]
    assert not bad, "models/ must import only torch and the standard library:\n" + "\n".join(bad)


def test_the_scan_catches_a_forbidden_import():
    tree = ast.parse(
        "import numpy\nfrom rfdetr_core.variants import Variant\ndef f():\n    from ..errors import X\n"
    )
    assert [m for _, m in _imported_modules(tree) if not _allowed(m)] == [
        "numpy",
        "rfdetr_core.variants",
        "..errors",
    ]
