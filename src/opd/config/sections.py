"""The config sections every run has, whatever its method and task, and the error a bad value raises.

The method's section (``method.<name>``), the task's fields and each sampling engine's section
(``sampling.<engine>``) are owned by their modules (``methods/``, ``tasks/``, ``engines/``);
``config.loading`` assembles all of them into one ``Config``. This module imports nothing of opd,
so any module may use these types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text``: a number of seconds, or ``1d2h30m10s`` in any subset of those units (``3h50m``, ``90m``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    value = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    match = DURATION.fullmatch(value)
    if not value or match is None:
        raise ValueError(f"{text!r} is not a duration (seconds, or like 3h50m, 90m, 1d2h)")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key '<key>' <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


class Registry(dict):
    """What a config key picks from by name (``method.name``, ``task.name``, ``sampling.engine``): entries filed by
    their modules at import, looked up with a one-line ``ConfigError`` naming the key and the choices."""

    def __init__(self, key: str, what: str):
        super().__init__()
        self.key, self.what = key, what

    def add(self, name: str, entry):
        if name in self:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self[name] = entry
        return entry

    def named(self, name: str):
        if name not in self:
            raise ConfigError(f"config key '{self.key}' must be one of {', '.join(repr(n) for n in self)}, got {name!r}")
        return self[name]


def validate_client_settings(section, prefix: str, dist_timeout: float) -> None:
    """The HTTP client keys every remote service's section spells the same way (``teacher``, ``method.ovd.http``):
    ``deadline`` (seconds per request, everything included), ``retries``, ``max_reply_mb`` and the outage policy."""
    require(section.deadline > 0, f"{prefix}.deadline", f"must be > 0 seconds, got {section.deadline}")
    require(section.retries >= 0, f"{prefix}.retries", f"must be >= 0, got {section.retries}")
    require(section.max_reply_mb > 0, f"{prefix}.max_reply_mb", f"must be > 0, got {section.max_reply_mb}")
    validate_outage(section.outage, section.outage_seconds, f"{prefix}.", dist_timeout)


def validate_outage(action: str, seconds: float, keys: str, dist_timeout: float) -> None:
    """``<keys>outage_seconds``: how long ``<keys>outage=wait`` waits for a service to come back — less than
    ``train.dist_timeout``, since with several ranks the others wait that long for the waiting one in a collective."""
    require(seconds > 0, f"{keys}outage_seconds", f"must be > 0 seconds, got {seconds}")
    require(
        action != "wait" or seconds < dist_timeout, f"{keys}outage_seconds",
        f"must be below train.dist_timeout ({dist_timeout:g} s): while one rank waits for the service, the others wait "
        f"for that rank in a collective, got {seconds:g}",
    )


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # allow starting afresh in an output_dir that already holds a run
    allow_changes: bool = False  # resume even where settings that alter the training trajectory changed (recorded)
    # wall-clock limit of this process's run (a job's limit: 3h50m, 90m, or seconds): it stops resumably, with a
    # checkpoint, when the next step might not finish before it (docs/cluster.md)
    time_limit: float | str | None = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear", a list of module names (matched as name suffixes, e.g. [q_proj, v_proj]), a comma-separated
    # string of them, or a regular expression over the full module names
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelConfig:
    path: str | None = None  # a local HF checkpoint directory, or world:teacher / world:student
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # passed to from_pretrained: eager, sdpa, flash_attention_2/3, flex_attention, ...; None = transformers' choice
    # for the model (sdpa where the architecture has it). Checked against what is installed and what the
    # architecture supports before any weights load (models/attention.py)
    attn_implementation: str | None = None


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)
    # the student's chat template, replacing the tokenizer's own (a base model has none): a .jinja file, or the
    # template's text. Prompts, the pairing check and the saved checkpoints all use it
    chat_template: str | None = None


@dataclass
class TeacherConfig(ModelConfig):
    # Multi-teacher routing (e.g. ExOPD merging domain experts): route name -> checkpoint path or server URL.
    # Each example names its route (task.teacher_field); examples without one use teacher.path / teacher.url.
    routes: dict[str, str] = field(default_factory=dict)
    temperature: float = 1.0  # the teacher's sampled-token log-probs are those of softmax(logits / temperature)
    # A teacher behind an OpenAI-compatible server (stock vLLM: /v1/completions with prompt_logprobs), instead of
    # teacher.path: its base URL, e.g. http://127.0.0.1:8000 (the /v1 suffix is optional). See docs/engines.md.
    url: str | None = None
    model: str | None = None  # the served model's name; None = the server's only model
    tokenizer_path: str | None = None  # a local copy of the served model's tokenizer (pairing check); None = the student's
    # shared: the teacher reads the student's token ids (the pairing check makes sure they mean the same to it);
    # own: a teacher with a tokenizer of its own reads the student's completions as text, scored span by span where
    # the two tokenizations share boundaries (docs/methods.md, "A teacher with another tokenizer"). null, what
    # configs saved before this key took these values hold, means shared
    tokenizer: str | None = "shared"
    top_k: int = 20  # top-k log-probs per position that full-vocabulary losses get (vLLM's --max-logprobs caps it)
    api_key_env: str | None = None  # the environment variable holding the server's API key (never the key itself)
    deadline: float = 120.0  # seconds per request, everything included
    retries: int = 3  # further attempts after a transient failure, with exponential backoff
    concurrency: int = 8  # requests in flight at once (one sequence each)
    max_reply_mb: float = 256.0  # a longer reply is an error, never read into memory
    # when the server, having answered, stops answering: wait (up to outage_seconds, the step paused) or stop (a
    # checkpoint at the step boundary, exit status 75, resumable); docs/cluster.md
    outage: Literal["wait", "stop"] = "wait"
    outage_seconds: float = 600.0
    # where the local teacher, its routes and a checkpoint reference run (cuda:1, cpu, ...); None = the student's
    # device. A LoRA student's initial-weights reference is the student itself and stays with it
    device: str | None = None


@dataclass
class PairingConfig:
    allow_chat_template_mismatch: bool = False  # a teacher whose chat template renders differently: a warning, not a refusal
    # a teacher whose tokenizer has the same token->id map but splits text differently: a warning, not a refusal
    allow_tokenization_mismatch: bool = False


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 64
    # who generates the student's samples: a registered engine (engines/: hf, opd's KV-cached decoder; vllm); each
    # engine's own keys are its section sampling.<engine>
    engine: str = "hf"
    # push the student's weights into the engine every this many steps (engines that hold their own copy of the
    # weights); in between the engine samples from older weights and the truncated importance weight
    # (method.is_correction_cap) corrects for it
    sync_every: int = 1
    # generation overlapped with training: step k trains on rows the weights after step k - max_staleness generated,
    # while the engine generates the rows of step k + max_staleness (0 = sample each step's rows when it starts)
    max_staleness: int = 0


@dataclass
class MethodCommonConfig:
    """The keys of the ``method`` section shared by every method (each method adds its own subsection)."""

    name: str = "opd"
    # what a step's per-token loss terms are divided by, over the whole step (all micro-batches): "auto" = the method's
    # default (OPD+ unbiased: constant; the others: token_mean); see objectives.common.Normaliser
    reduction: Literal["auto", "token_mean", "seq_mean_token_mean", "constant"] = "auto"
    normalizer_tokens: int | None = None  # the constant normaliser's tokens per row; None = sampling.max_new_tokens
    clip_eps: float | None = None  # PPO clip on the ratio; None = no clipping
    # truncated sampler/trainer importance weight cap C; None = on with C = 5 when sampling truncates (top-p / top-k),
    # since the student's log-probs are those of the untruncated tempered softmax, or when vLLM samples (its
    # numerics and, with sampling.sync_every > 1, its weights differ from the trainer's), else off
    is_correction_cap: float | None = None


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
    # optimizer updates per batch of rollouts: > 1 reuses the batch, the policy-gradient ratio taken against the
    # log-probs from before the first update (what gives method.clip_eps something to clip)
    updates_per_batch: int = 1
    max_consecutive_nonfinite: int = 5
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # several processes (torchrun / accelerate launch): seconds a rank waits for the others in one collective
    # (rank 0 writes checkpoints and final/ while the others wait)
    dist_timeout: float = 3600.0
    # several processes: none = every rank holds the whole student (data parallel); fsdp = FSDP2 shards the
    # student's weights, gradients and optimizer state over the ranks (teachers stay whole on every rank)
    sharding: Literal["none", "fsdp"] = "none"
    # recompute each decoder layer's activations in the backward (non-reentrant) instead of keeping them: the
    # student's activation memory falls from every layer's to about one layer's, for one more forward's time
    gradient_checkpointing: bool = False
    # tokens (prompt + completion) per training micro-batch: the step's rows are sorted by length and packed into
    # micro-batches under this budget (a longer row is a micro-batch of its own), and balanced over the ranks by
    # tokens; None = train.grad_accum micro-batches of equal rows. The gradient does not depend on the grouping
    micro_batch_tokens: int | None = None
    # padding-free micro-batches: each micro-batch's rows packed into bins as long as its longest row, with per-row
    # position ids and no padding between rows (the attention implementation must honour row boundaries)
    packing: bool = False


@dataclass
class EvalConfig:
    every: int = 20  # steps; 0 = only before and after training
    num_prompts: int | None = None  # evaluate at most this many held-out rows; None = all of them
    batch_size: int = 256
    k: int = 1  # samples per prompt for avg@k / pass@k (1 = greedy accuracy only)
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None = sampling.max_new_tokens
    teacher: bool = True  # also report the teacher's accuracy once


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0 = none during the run
    keep_last: int = 2
    at_end: bool = True  # also checkpoint the last step, so that a finished run can be resumed with more steps


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True
    # where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (training/trackers.py);
    # None = [tensorboard] when log.tensorboard is on, else none
    report_to: list[str] | None = None

    def trackers(self) -> list[str]:
        return list(self.report_to) if self.report_to is not None else (["tensorboard"] if self.tensorboard else [])


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # log.report_to's names: their packages
