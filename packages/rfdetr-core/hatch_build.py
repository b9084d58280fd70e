"""Hatch build hook: put the top-level ``csrc/`` CUDA sources into the wheel as ``rfdetr_core/_csrc``.

Two ways a wheel gets built:
* from the workspace checkout (``pip install packages/rfdetr-core``, ``uv build --wheel`` on the folder):
  the sources are at ``../../csrc`` and are force-included here;
* from the sdist (``uv build``, ``pip install rfdetr-core-*.tar.gz``): the sdist already stores them inside
  the package tree (``src/rfdetr_core/_csrc``, see pyproject.toml), so they ship as ordinary package files.
Neither present means a broken source tree: fail rather than ship a wheel that cannot build its kernel.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CsrcBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        if (root / "src" / "rfdetr_core" / "_csrc").is_dir():
            return
        checkout = root.parent.parent / "csrc"
        if not any(checkout.glob("*.cu")):
            raise RuntimeError(
                f"rfdetr-core: CUDA sources not found at {checkout} nor in src/rfdetr_core/_csrc; "
                "build from the workspace checkout or from the sdist."
            )
        build_data["force_include"][str(checkout)] = "rfdetr_core/_csrc"
