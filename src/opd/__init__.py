"""opd: on-policy distillation of language models.

The Python API (docs/python.md): ``opd.train``, ``opd.evaluate`` and ``opd.load_config`` do what ``opd train``,
``opd eval`` and the config files do, and take Python objects where a config names one. ``opd.Preempted`` is
what ``opd.train`` raises when a signal or ``run.time_limit`` stopped the run resumably.
"""

from .api import evaluate, load_config, train
from .training.stopping import Preempted

__version__ = "0.1.0"
__all__ = ["Preempted", "evaluate", "load_config", "train"]
