"""Options from the CLI, a YAML file and the Python API -> one :class:`~rfdetr_train.config.RunConfig`.

Options are flat names (``batch_size=8``, ``data="./coco"``); each goes to the config section that declares
that field (``data``, ``eval`` or ``train``; a field declared by several sections goes to all of them). A
YAML file may also nest them under section names (``train: {lr: 1e-3}``). Explicit options win over the
file. An unknown name is an error that lists the close matches.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rfdetr_core.errors import RFDETRError
from rfdetr_train.config import RunConfig

SECTIONS = ("data", "eval", "train")
# CLI / API names that differ from the field they set.
ALIASES = {"data": ("data", "path"), "eval_max_dets": ("eval", "max_dets"), "max_dets": ("eval", "max_dets")}


class ConfigError(RFDETRError):
    """An option or configuration file that cannot be used."""


def _section_fields() -> dict[str, set[str]]:
    return {name: set(RunConfig.model_fields[name].annotation.model_fields) for name in SECTIONS}


def route(options: Mapping[str, Any], where: str = "option") -> dict[str, dict[str, Any]]:
    """Flat ``{name: value}`` -> ``{section: {field: value}}``; ``None`` values are left out."""
    fields = _section_fields()
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in options.items():
        if value is None:
            continue
        key = name.replace("-", "_")
        if key in ALIASES:
            section, field = ALIASES[key]
            out[section][field] = value
            continue
        homes = [s for s in SECTIONS if key in fields[s]]
        if not homes:
            known = sorted(set().union(*fields.values()) | set(ALIASES))
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown {where} {name!r}.{hint}")
        for s in homes:
            out[s][key] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A YAML options file -> ``{section: {field: value}}`` (flat keys routed, section keys kept)."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: no such file.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p} must hold a mapping of option names to values.")
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            out[key].update(value)
        else:
            flat[key] = value
    for s, vals in route(flat, where=f"key in {p}").items():
        out[s].update(vals)
    return out


def build_run_config(options: Mapping[str, Any], config_file: str | os.PathLike | None = None) -> RunConfig:
    """The run configuration from a YAML file (optional) overridden by explicit ``options``."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if config_file is not None:
        for s, vals in read_yaml(config_file).items():
            merged[s].update(vals)
    for s, vals in route(options).items():
        merged[s].update(vals)
    return validate_run_config(merged)


def validate_run_config(data: Mapping[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"{loc}: {err['msg']}")
        raise ConfigError("Invalid configuration: " + "; ".join(lines)) from None


def dump_yaml(run: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False)


def load_saved(path: str | os.PathLike) -> RunConfig:
    """A run's ``config.yaml`` (sectioned, as :func:`dump_yaml` writes it)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read the run configuration {path}: {exc}") from None
    return validate_run_config(data or {})
