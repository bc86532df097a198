"""Sampling engines: the ``Sampler`` protocol and the registry of the engines ``sampling.engine`` names (``hf``,
``vllm``), and a served model's sampler. Every module in this package is imported, so each engine registers itself;
an engine's optional package (vllm) is imported only when that engine is built."""

import importlib
import pkgutil

from .base import ENGINE_REGISTRY, Engine, Sampler, engine_class, register_engine

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ENGINE_REGISTRY", "Engine", "Sampler", "engine_class", "register_engine"]
