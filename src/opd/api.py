"""opd from Python: ``opd.load_config``, ``opd.train`` and ``opd.evaluate`` (docs/python.md).

Each takes what the command line takes — a config file and ``key.path=value`` overrides — and also
sections as keyword arguments (``train={"steps": 20}``), whose values may be Python objects where the
config names one: a reward function (``task={"reward_function": fn}``, or a list of them) or an
environment class or factory (``task={"environment": MyEnv}``). Such an object is held under a
``python:`` name (``config.objects``), which the saved ``config.yaml`` shows. Everything else runs as
``opd train`` runs it: the same checks, the run-directory lock, the pre-flight pass, the pairing check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .config.loading import build_config, deep_merge, read_yaml, warn_ignored_keys
from .config.objects import hold
from .config.schema import Config
from .config.sections import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def _named(value: Any) -> Any:
    """A config value: YAML's scalars, lists and mappings as they are; any other object held by a ``python:`` name."""
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_named(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return hold(value)


def config_file(path: str | os.PathLike) -> Path:
    """``path`` as given, else the shipped config of that name (``configs/demo.yaml`` or ``demo.yaml`` from anywhere)."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = CONFIG_DIR / (given.relative_to("configs") if given.parts[:1] == ("configs",) else given)
    return shipped if shipped.is_file() else given


def load_config(config: str | os.PathLike | dict | None = None, overrides: Sequence[str] = (), **sections: Any) -> Config:
    """The validated config of a YAML file (or a mapping, or the defaults), its ``sections`` keyword arguments laid
    over it and then the ``key.path=value`` ``overrides``; a ``ConfigError`` naming the key otherwise."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key.path=value strings, got the string {overrides!r}")
    raw = dict(config) if isinstance(config, dict) else read_yaml(config_file(config)) if config is not None else {}
    return warn_ignored_keys(build_config(deep_merge(raw, _named(sections)), list(overrides)))


def train(config: str | os.PathLike | dict | Config | None = None, overrides: Sequence[str] = (), **sections: Any) -> dict:
    """Train as ``opd train`` does and return the run's summary (also written to ``summary.json``)."""
    from .training.loop import train as run

    return run(config if isinstance(config, Config) else load_config(config, overrides, **sections))


def evaluate(model: str, data: str | None = None, task: str | None = None, k: int = 1, overrides: Sequence[str] = (),
             **sections: Any) -> dict:
    """Held-out accuracy of a checkpoint, as ``opd eval`` computes it: every row of ``data`` (task ``math``), or the
    evaluation split of ``task``. A run directory (or its ``final/``) is its final model on the run's own task and
    held-out split, with the run's sampling and eval settings; an embedded ``world:`` model defaults to its own
    arithmetic task."""
    from .tasks.math import eval_split_of
    from .tasks.rows import dataset_splits

    run_dir = run_directory(model)
    if run_dir is not None and data is None and task is None:  # a run: its final model on its own task and held-out split
        from .config.loading import load_saved_config

        cfg = load_saved_config(run_dir / "config.yaml", [f"student.path={run_dir / 'final'}", f"eval.k={k}", "method.name=sft", *overrides])
        return evaluate_config(cfg, str(model), cfg.task.name)
    if data is None and task is None:
        if not str(model).startswith("world:"):
            raise ConfigError(f"opd eval {model}: name what to evaluate it on, the data (--data FILE) or a task (--task NAME)")
        task = "arithmetic"
    task = task or "math"
    # student, task, sampling, eval and train (device, threads, precision) matter here; sft needs no teacher
    base = [f"task.name={task}", f"student.path={model}", f"eval.k={k}", "method.name=sft"]
    if data is not None:
        base += [f"task.path={data}", f"task.eval_path={data}"]
    cfg = load_config(None, [*base, *overrides], **sections)
    if data is not None and dataset_splits(data) is not None and cfg.task.split is None:
        # a DatasetDict: its evaluation split alone is read (it need not have a training split)
        cfg.task.split = cfg.task.eval_split = eval_split_of(data, cfg.task.eval_split, required=True)
    return evaluate_config(cfg, str(model), task)


def run_directory(model: str | os.PathLike) -> Path | None:
    """The run directory ``model`` names (it, or its ``final/``, holds the run's config.yaml and final model); None
    for anything else."""
    path = Path(model)
    run = path.parent if path.name == "final" else path
    return run if (run / "config.yaml").is_file() and (run / "final").is_dir() else None


def evaluate_config(cfg: Config, model: str, task: str) -> dict:
    """``evaluate``'s work once its config is built."""
    import torch

    from .training.assembly import build_eval_session
    from .training.evaluation import evaluate as evaluate_examples

    s = build_eval_session(cfg)  # the same set-up as a training run's: the data checked, the engine sampling.engine names
    try:
        examples = s.task.eval_examples()[: cfg.eval.num_prompts]
        generator = torch.Generator(device=s.device).manual_seed(cfg.run.seed)
        results = evaluate_examples(
            s.sampler, s.tokenizer, s.task, examples, cfg.sampling, cfg.eval.k, cfg.eval.temperature, cfg.eval.batch_size, generator,
            s.context, cfg.task.chat_template_kwargs,
        )
    finally:
        s.sampler.close()
    summary = {"model": model, "task": task, "engine": cfg.sampling.engine, "prompts": len(examples), "eval_set": s.task.describe_eval(), **results}
    summary["data_checks"] = s.data_report.get("eval")
    return summary
