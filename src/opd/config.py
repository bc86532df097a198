"""Typed configuration: dataclasses, YAML files, dotted command-line overrides, validation.

A config is a tree of plain dataclasses. ``load_config(path, overrides)`` reads YAML, applies
``key.path=value`` overrides (values parsed as YAML scalars), checks every key and type
against the dataclasses and every value against its allowed range, and raises
``ConfigError`` with one line naming the offending key (with the closest valid key
suggested for a typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # allow starting afresh in an output_dir that already holds a run


@dataclass
class TaskConfig:
    name: Literal["arithmetic", "math"] = "arithmetic"
    # arithmetic
    min_digits: int = 3
    max_digits: int = 3
    eval_seed: int = 12345
    # math (JSONL file or datasets.save_to_disk directory)
    path: str | None = None
    eval_path: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
    teacher_field: str | None = None  # column naming each row's teacher route (teacher.routes)
    # both
    eval_size: int = 256


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class ModelConfig:
    path: str | None = None  # a local HF checkpoint directory, or world:teacher / world:student
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TeacherConfig(ModelConfig):
    # Multi-teacher routing (e.g. ExOPD merging domain experts): route name -> checkpoint path.
    # Each example names its route (task.teacher_field); examples without one use teacher.path.
    routes: dict[str, str] = field(default_factory=dict)


@dataclass
class PairingConfig:
    allow_chat_template_mismatch: bool = False


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 64


@dataclass
class OPDConfig:
    """Reverse-KL OPD (METHODS §1)."""

    coef: float = 1.0
    discount: float = 0.0  # γ: 0 = per-token advantage, 1 = full return


@dataclass
class GKDConfig:
    """Generalised JSD over the full vocabulary (METHODS §2)."""

    beta: float = 0.5
    temperature: float = 0.9
    lambda_onpolicy: float = 0.5
    seq_kd: bool = False  # off-policy batches use teacher samples instead of reference solutions
    top_k: int | None = None  # restrict both distributions to the teacher's top-K tokens
    top_k_tail: bool = False  # with top_k: keep the rest of the mass as one extra class instead of renormalising
    chunk_size: int | None = None  # token rows per chunk of the fused loss; None = about 2^25 logits per chunk


@dataclass
class SFTConfig:
    """Cross-entropy on reference solutions or teacher samples (METHODS §8)."""

    source: Literal["reference", "teacher"] = "reference"
    # fraction of reference-solution examples shown behind their privileged prompt (the task's problem + reference
    # solution): teaches a model to use privileged context, so it can later be its own OPSD teacher
    privileged_fraction: float = 0.0


@dataclass
class OPDPlusConfig:
    """Sampled-token f-divergence distillation, standard or unbiased (METHODS §5)."""

    divergence: Literal["reverse_kl", "forward_kl", "jsd", "hellinger", "tv"] = "jsd"
    unbiased: bool = True  # false = standard OPD advantage -f(u) (biased unless reverse KL)
    discount: float = 0.0  # γ on the f terms: 0 per-token, 1 full return
    log_ratio_clip: float | None = 6.0


@dataclass
class GOPDConfig:
    """G-OPD / ExOPD reward scaling with a reference model (METHODS §4)."""

    reward_scale: float = 1.25  # λ; 1 = OPD, > 1 = ExOPD
    reference: str | None = "student_init"  # the student's initial weights, or a HF checkpoint path
    discount: float = 0.0


@dataclass
class ReopoldConfig:
    """REOPOLD relaxed OPD (METHODS §6)."""

    mixture_lambda: float = 0.2
    floor_form: Literal["log_lambda_over_one_minus_lambda", "log_of_lambda_ratio"] = "log_lambda_over_one_minus_lambda"
    entropy_fraction: float = 0.2
    switch_step: int | None = None  # None = half of train.steps


@dataclass
class GRPOConfig:
    """GRPO with a verifier reward (METHODS §8)."""

    kl_coef: float = 0.0  # > 0 adds a k3 KL penalty to the student's initial weights
    scale_by_std: bool = True


@dataclass
class OPSDConfig:
    """On-policy self-distillation with a privileged-context teacher (METHODS §3)."""

    loss: Literal["jsd", "sampled"] = "jsd"  # full-vocabulary JSD_β, or the sampled-token advantage ℓ^T - ℓ^S
    beta: float = 0.5
    temperature: float | None = None  # logits divided by this before the loss; None = sampling.temperature
    top_k: int | None = None  # restrict both distributions to the teacher's top-K tokens (paper option: 50)
    top_k_tail: bool = False  # with top_k: keep the rest of the mass as one extra class instead of renormalising
    teacher_weights: Literal["fixed", "ema", "current"] = "fixed"
    ema_decay: float = 0.999
    chunk_size: int | None = None  # token rows per chunk of the fused loss; None = about 2^25 logits per chunk


@dataclass
class HTTPJudgeConfig:
    url: str | None = None  # base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000
    model: str = "judge"
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key)
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0


@dataclass
class OVDConfig:
    """On-policy verbal distillation (METHODS §7)."""

    judge: Literal["programmatic", "model", "http"] = "programmatic"
    judge_path: str | None = None  # model judge checkpoint; None = teacher.path
    threshold: float = 7.0  # θ: accept trajectories scoring ≥ θ
    replacement: Literal["trajectory", "step", "none"] = "trajectory"
    score_weight: float = 0.0  # w in r + w·score/9 (0: the score only filters)
    # leave teacher demonstrations that fail the task's verifier out of the group (no loss, not in its mean/std)
    # instead of training on them with a negative advantage
    drop_failed_demonstrations: bool = False
    http: HTTPJudgeConfig = field(default_factory=HTTPJudgeConfig)


@dataclass
class MethodConfig:
    name: Literal["opd", "gkd", "sft", "opd_plus", "gopd", "reopold", "grpo", "opsd", "ovd"] = "opd"
    reduction: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    clip_eps: float | None = None  # PPO clip on the ratio; None = no clipping
    is_correction_cap: float | None = None  # truncated sampler/trainer importance weight cap C
    opd: OPDConfig = field(default_factory=OPDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    opd_plus: OPDPlusConfig = field(default_factory=OPDPlusConfig)
    gopd: GOPDConfig = field(default_factory=GOPDConfig)
    reopold: ReopoldConfig = field(default_factory=ReopoldConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    opsd: OPSDConfig = field(default_factory=OPSDConfig)
    ovd: OVDConfig = field(default_factory=OVDConfig)


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    max_consecutive_nonfinite: int = 5
    threads: int | None = None  # torch intra-op threads; None = torch's default


@dataclass
class EvalConfig:
    every: int = 20  # steps; 0 = only before and after training
    num_prompts: int = 256
    batch_size: int = 256
    k: int = 1  # samples per prompt for avg@k / pass@k (1 = greedy accuracy only)
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None = sampling.max_new_tokens
    teacher: bool = True  # also report the teacher's accuracy once


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only the final model
    keep_last: int = 2


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
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
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return deep_merge(read_yaml(base_path, seen + (path.resolve(),)), raw)


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


def _all_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], full + "."))
    return keys


def _unknown_key_error(cls: type, prefix: str, name: str) -> ConfigError:
    full = f"{prefix}{name}"
    candidates = _all_keys(Config, "")
    close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not close:
        local = [f.name for f in dataclasses.fields(cls)]
        close = [f"{prefix}{c}" for c in difflib.get_close_matches(name, local, n=1, cutoff=0.5)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


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


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def validate(c: Config) -> None:
    """Refuse impossible values and meaningless combinations, naming the key."""
    t, s, m, e = c.train, c.sampling, c.method, c.eval
    _require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    _require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _require(
        t.prompts_per_step % t.grad_accum == 0,
        "train.grad_accum",
        f"must divide train.prompts_per_step ({t.prompts_per_step}), got {t.grad_accum}",
    )
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", f"must be > 0 or null, got {t.grad_clip}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(all(0 <= b < 1 for b in t.betas), "train.betas", f"must lie in [0, 1), got {t.betas}")
    _require(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
    _require(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1 or null, got {t.threads}")
    _require(s.samples_per_prompt >= 1, "sampling.samples_per_prompt", f"must be >= 1, got {s.samples_per_prompt}")
    _require(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    _require(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _require(s.top_k >= 0, "sampling.top_k", f"must be >= 0, got {s.top_k}")
    _require(s.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    _require(m.clip_eps is None or 0 < m.clip_eps < 1, "method.clip_eps", f"must be in (0, 1) or null, got {m.clip_eps}")
    _require(
        m.is_correction_cap is None or m.is_correction_cap >= 1,
        "method.is_correction_cap",
        f"must be >= 1 or null, got {m.is_correction_cap}",
    )
    _require(0 <= m.opd.discount <= 1, "method.opd.discount", f"must be in [0, 1], got {m.opd.discount}")
    _require(0 <= m.sft.privileged_fraction <= 1, "method.sft.privileged_fraction", f"must be in [0, 1], got {m.sft.privileged_fraction}")
    _require(
        m.sft.privileged_fraction == 0 or m.sft.source == "reference",
        "method.sft.privileged_fraction", "needs method.sft.source=reference (the privileged prompt holds the reference solution)",
    )
    _require(0 <= m.gkd.beta <= 1, "method.gkd.beta", f"must be in [0, 1], got {m.gkd.beta}")
    _require(m.gkd.temperature > 0, "method.gkd.temperature", f"must be > 0, got {m.gkd.temperature}")
    _require(0 <= m.gkd.lambda_onpolicy <= 1, "method.gkd.lambda_onpolicy", f"must be in [0, 1], got {m.gkd.lambda_onpolicy}")
    _require(m.gkd.chunk_size is None or m.gkd.chunk_size >= 1, "method.gkd.chunk_size", f"must be >= 1 or null, got {m.gkd.chunk_size}")
    _require(m.gkd.top_k is None or m.gkd.top_k >= 1, "method.gkd.top_k", f"must be >= 1 or null, got {m.gkd.top_k}")
    _require(not m.gkd.top_k_tail or m.gkd.top_k is not None, "method.gkd.top_k_tail", "needs method.gkd.top_k")
    _require(0 <= m.opd_plus.discount <= 1, "method.opd_plus.discount", f"must be in [0, 1], got {m.opd_plus.discount}")
    _require(
        m.opd_plus.log_ratio_clip is None or m.opd_plus.log_ratio_clip > 0,
        "method.opd_plus.log_ratio_clip",
        f"must be > 0 or null, got {m.opd_plus.log_ratio_clip}",
    )
    _require(m.gopd.reward_scale > 0, "method.gopd.reward_scale", f"must be > 0, got {m.gopd.reward_scale}")
    _require(0 <= m.gopd.discount <= 1, "method.gopd.discount", f"must be in [0, 1], got {m.gopd.discount}")
    if m.name == "gopd" and m.gopd.reward_scale != 1.0:
        _require(
            m.gopd.reference is not None,
            "method.gopd.reference",
            f"is required when method.gopd.reward_scale != 1 (got {m.gopd.reward_scale}): "
            "use student_init or a checkpoint sharing the student's tokenizer",
        )
    _require(0 < m.reopold.mixture_lambda < 1, "method.reopold.mixture_lambda", f"must be in (0, 1), got {m.reopold.mixture_lambda}")
    _require(0 < m.reopold.entropy_fraction <= 1, "method.reopold.entropy_fraction", f"must be in (0, 1], got {m.reopold.entropy_fraction}")
    _require(m.grpo.kl_coef >= 0, "method.grpo.kl_coef", f"must be >= 0, got {m.grpo.kl_coef}")
    _require(0 <= m.opsd.beta <= 1, "method.opsd.beta", f"must be in [0, 1], got {m.opsd.beta}")
    _require(m.opsd.temperature is None or m.opsd.temperature > 0, "method.opsd.temperature", "must be > 0 or null")
    _require(m.opsd.top_k is None or m.opsd.top_k >= 1, "method.opsd.top_k", f"must be >= 1 or null, got {m.opsd.top_k}")
    _require(0 < m.opsd.ema_decay < 1, "method.opsd.ema_decay", f"must be in (0, 1), got {m.opsd.ema_decay}")
    _require(m.opsd.chunk_size is None or m.opsd.chunk_size >= 1, "method.opsd.chunk_size", f"must be >= 1 or null, got {m.opsd.chunk_size}")
    _require(not m.opsd.top_k_tail or m.opsd.top_k is not None, "method.opsd.top_k_tail", "needs method.opsd.top_k")
    if m.name == "opsd":
        _require(
            c.teacher.path is None,
            "teacher.path",
            "must be null for opsd: the teacher is the student itself, conditioned on the reference solution",
        )
        if c.task.name == "math":
            _require(
                c.task.solution_field is not None,
                "task.solution_field",
                "must name the reference-solution field: opsd's teacher needs privileged context",
            )
    o = m.ovd
    _require(0 <= o.threshold <= 9, "method.ovd.threshold", f"must be in [0, 9], got {o.threshold}")
    _require(o.http.timeout > 0, "method.ovd.http.timeout", f"must be > 0, got {o.http.timeout}")
    _require(o.http.retries >= 0, "method.ovd.http.retries", f"must be >= 0, got {o.http.retries}")
    if m.name == "ovd":
        if o.judge == "programmatic" or o.replacement == "step":
            _require(
                c.task.name == "arithmetic",
                "method.ovd.judge" if o.judge == "programmatic" else "method.ovd.replacement",
                "needs a task whose steps can be checked (arithmetic); use judge=model or judge=http "
                "with replacement=trajectory",
            )
        if o.replacement == "step":
            _require(o.judge == "programmatic", "method.ovd.replacement", "'step' needs per-step scores (judge=programmatic)")
        if o.judge == "http":
            _require(o.http.url is not None, "method.ovd.http.url", "is required for judge=http")
        if o.judge == "model":
            _require(o.judge_path is not None or c.teacher.path is not None, "method.ovd.judge_path", "is required for judge=model")
    if m.name in ("grpo", "ovd"):
        _require(s.samples_per_prompt >= 2, "sampling.samples_per_prompt", f"must be >= 2 for {m.name}'s group baseline, got {s.samples_per_prompt}")
    _require(e.every >= 0, "eval.every", f"must be >= 0, got {e.every}")
    _require(e.num_prompts >= 1, "eval.num_prompts", f"must be >= 1, got {e.num_prompts}")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    _require(e.k >= 1, "eval.k", f"must be >= 1, got {e.k}")
    _require(c.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {c.checkpoint.every}")
    _require(c.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.checkpoint.keep_last}")
    _require(c.student.path is not None, "student.path", "is required (a local HF checkpoint, or world:student)")
    lora = c.student.lora
    _require(lora.r >= 1, "student.lora.r", f"must be >= 1, got {lora.r}")
    _require(0 <= lora.dropout < 1, "student.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    if c.task.name == "math":
        _require(c.task.path is not None, "task.path", "is required for task.name=math (a JSONL file or a saved dataset)")
    else:
        _require(1 <= c.task.min_digits <= c.task.max_digits, "task.min_digits", "must be >= 1 and <= task.max_digits")
    _require(c.task.eval_size >= 1, "task.eval_size", f"must be >= 1, got {c.task.eval_size}")
    if needs_teacher(c):
        _require(
            c.teacher.path is not None or bool(c.teacher.routes), "teacher.path", f"is required by method '{m.name}'"
        )
    if c.teacher.routes:
        _require(
            m.name in ROUTABLE_METHODS,
            "teacher.routes",
            f"works with the sampled-token methods ({', '.join(ROUTABLE_METHODS)}), not '{m.name}'",
        )
        if c.task.name == "math":
            _require(c.task.teacher_field is not None, "task.teacher_field", "must name the column that routes each row to a teacher")


ROUTABLE_METHODS = ("opd", "opd_plus", "gopd", "reopold")


def needs_reference(c: Config) -> bool:
    """Whether the configured method scores with a reference model (G-OPD with λ ≠ 1, GRPO's KL penalty)."""
    if c.method.name == "gopd":
        return c.method.gopd.reward_scale != 1.0
    return c.method.name == "grpo" and c.method.grpo.kl_coef > 0


def needs_teacher(c: Config) -> bool:
    """Whether the configured method scores with (or samples from) a separate teacher model."""
    if c.method.name in ("opd", "gkd", "opd_plus", "gopd", "reopold"):
        return True
    if c.method.name == "sft":
        return c.method.sft.source == "teacher"
    if c.method.name == "ovd":
        return c.method.ovd.replacement != "none"
    return False


# ----------------------------------------------------------------------------- saving


SECRET_WORDS = ("key", "token", "secret", "password")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def redact(tree: Any) -> Any:
    """Replace values of secret-looking keys (api_key, token, …) so saved configs hold no secrets."""
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
