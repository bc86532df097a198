"""Methods, one module each, registered by name (``method.name``). Every module in this package is imported,
so a new method is one new file here."""

import importlib
import pkgutil

from .base import METHOD_REGISTRY, Method, Needs, Session, create_method, method_class, register
from .batch import Batch

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHOD_REGISTRY", "Batch", "Method", "Needs", "Session", "create_method", "method_class", "register"]
