"""Hydra and OmegaConf composition errors, translated into one sentence that names the fix."""

from __future__ import annotations

import difflib
from typing import Any

from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from specbench.config import SpecBenchConfig


def _setting_names(node: Any, prefix: str = "") -> list[str]:
    names = []
    for key in node:
        name = f"{prefix}{key}"
        names.append(name)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and child._metadata.object_type is not dict:
            names += _setting_names(child, f"{name}.")
    return names


def explain_config_error(error: Exception) -> str:
    """One sentence for a Hydra/OmegaConf composition error: what is wrong and how to fix it."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return f"{option!r} is not a {group} option: choose one of {', '.join(sorted(error.options))}."
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and getattr(cause, "full_key", None):
        key = cause.full_key
        close = difflib.get_close_matches(key, _setting_names(OmegaConf.structured(SpecBenchConfig)), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{key!r} is not a setting: {hint}`specbench --cfg job` lists every key."
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        problem = str(cause.msg).splitlines()[0].rstrip(".")
        return f"{cause.full_key}: {problem}; give it a value of the right type."
    return str(error).strip().splitlines()[0]
