"""Names of Python objects in a config: ``module:attribute`` import paths (``task.reward_function``,
``task.environment``), and objects handed to the Python API (``opd.train(..., task={"reward_function": fn})``),
which are kept here under a ``python:`` name that the config then holds (docs/python.md).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .sections import ConfigError

PYTHON = "python:"
_HELD: dict[str, Any] = {}


def hold(obj: Any) -> str:
    """The config name of ``obj``, an object given to the Python API: ``python:<its name>`` (numbered when taken)."""
    for name, held in _HELD.items():
        if held is obj:
            return name
    base = f"{PYTHON}{getattr(obj, '__qualname__', None) or type(obj).__name__}"
    name, n = base, 1
    while name in _HELD:
        n += 1
        name = f"{base}#{n}"
    _HELD[name] = obj
    return name


def is_held(value: Any) -> bool:
    return isinstance(value, str) and value in _HELD


def import_object(path: str, key: str) -> Any:
    """What ``path`` names: an object given to the Python API, or ``module:attribute`` / ``module.attribute``
    imported — from the installed packages or, as ``python -m`` would, the working directory (searched after them,
    so a ``rewards.py`` beside the config is found by ``opd train`` too); a ``ConfigError`` naming ``key`` otherwise."""
    if path in _HELD:
        return _HELD[path]
    if path.startswith(PYTHON):
        raise ConfigError(
            f"config key '{key}' is {path!r}, a Python object given to opd.train in another process; "
            "run it through the Python API again with that object, or name an importable module:attribute"
        )
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"config key '{key}' must be module:attribute, got {path!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config key '{key}': {path!r} cannot be imported ({type(err).__name__}: {err})") from None
