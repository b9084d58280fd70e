"""Import structure of the packages, from their source (AST), every import statement counted (also those
inside functions and under ``TYPE_CHECKING``):

* the network under ``rfdetr_core/models/`` imports only torch and the standard library (variants, weights,
  errors and everything else of core map onto it from outside, in ``rfdetr_core.factory``);
* no module of ``rfdetr_core`` or ``rfdetr_train`` imports, directly or through others, a module that imports
  it back.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import rfdetr_core
import rfdetr_core.models
import rfdetr_train

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


def _module_graph(package) -> dict[str, set[str]]:
    """``module -> modules of the same package it imports`` (``from pkg import sub`` counts as ``pkg.sub``)."""
    root = Path(package.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[
            ".".join(
                [package.__name__] + parts[:-1] if parts[-1] == "__init__" else [package.__name__] + parts
            )
        ] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).rstrip(".")
                base = base if node.level else node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one module)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo.extend(graph[m])
    groups = {frozenset({m} | {o for o in reach[m] if m in reach[o]}) for m in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def test_no_import_cycles_in_train():
    assert _cycles(_module_graph(rfdetr_train)) == []


def test_no_import_cycles_in_core_outside_the_op_backend():
    # rfdetr_core.ops.backend imports ops.cuda_ext lazily to build the CUDA kernel on demand, and cuda_ext
    # reads the backend switch from it: the op registration's own pair, left to its owner.
    cycles = _cycles(_module_graph(rfdetr_core))
    assert [c for c in cycles if not all(m.startswith("rfdetr_core.ops.") for m in c)] == []


def test_the_cycle_scan_sees_a_lazy_import_back(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import cyclepkg

    assert _cycles(_module_graph(cyclepkg)) == [["cyclepkg.a", "cyclepkg.b"]]
