"""The config sections every run has, whatever its method and task, and the error a bad value raises.

The method's section (``method.<name>``) and the task's fields are owned by their modules
(``methods/``, ``tasks/``); ``config.py`` assembles all of them into one ``Config``. This
module imports nothing of opd, so any module may use these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key '<key>' <message>")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # allow starting afresh in an output_dir that already holds a run
    allow_changes: bool = False  # resume even where settings that alter the training trajectory changed (recorded)


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


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)


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
    tokenizer: str | None = None  # a local copy of the served model's tokenizer (pairing check); None = the student's
    top_k: int = 20  # top-k log-probs per position that full-vocabulary losses get (vLLM's --max-logprobs caps it)
    api_key_env: str | None = None  # the environment variable holding the server's API key (never the key itself)
    deadline: float = 120.0  # seconds per request, everything included
    retries: int = 3  # further attempts after a transient failure, with exponential backoff
    concurrency: int = 8  # requests in flight at once (one sequence each)
    max_reply_mb: float = 256.0  # a longer reply is an error, never read into memory


@dataclass
class PairingConfig:
    allow_chat_template_mismatch: bool = False


@dataclass
class VLLMConfig:
    """The in-process vLLM engine of ``sampling.engine: vllm`` (see docs/engines.md)."""

    gpu_memory_utilization: float = 0.3  # the share of GPU memory the engine may take (weights + KV cache)
    kv_cache_gb: float | None = None  # KV-cache size; None = 1 GiB on CPU, gpu_memory_utilization's rest on GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = student.dtype
    enforce_eager: bool | None = None  # None = eager on CPU, CUDA graphs on GPU
    max_model_len: int | None = None  # None = the student's context length
    sleep: bool = False  # GPU: free the engine's memory while the trainer works (vLLM sleep mode, level 1)


@dataclass
class SamplingConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 64
    engine: Literal["hf", "vllm"] = "hf"  # who generates the student's samples: opd's KV-cached decoder or vLLM
    # push the student's weights into the engine every this many steps (vllm only); in between the engine samples
    # from older weights and the truncated importance weight (method.is_correction_cap) corrects for it
    sync_every: int = 1
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


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
