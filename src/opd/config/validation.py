"""Checking a built ``Config``: impossible values and meaningless combinations are refused, naming the key, before
any model loads.

The generic sections are checked here; the task's section by its ``TaskConfig.validate``, the engine's by its
``Engine.validate``, the method's by its ``Method.validate``; then what the method needs (``Method.needs``)
against the rest, and what the engine and the task declare (stop strings, weights to push) against each other.
"""

from __future__ import annotations

import importlib.util
import math
import os

from ..engines.base import ENGINE_REGISTRY, engine_class
from ..engines.served import is_url
from ..episodes.environments import EpisodicTask
from ..methods.base import METHOD_REGISTRY, method_class
from ..models.attention import implementation_problem
from ..models.prompts import ChatTemplateError, chat_template_text
from ..parallel.launchers import launched_world, unsupported_launch
from ..tasks.base import TASK_REGISTRY
from ..tasks.reward_functions import load_reward_functions
from .schema import Config
from .sections import TRACKERS, ConfigError, parse_duration, require, validate_client_settings

FLOAT32_MAX = 3.4028234663852886e38


def validate(c: Config) -> None:
    """Refuse impossible values and meaningless combinations, naming the key.

    The generic sections are checked here; then the task's section (``TaskConfig.validate``), the
    method's (``Method.validate``), and what the method needs (``Method.needs``) against the rest.
    """
    t, s, m, e = c.train, c.sampling, c.method, c.eval
    require(bool(c.run.output_dir.strip()), "run.output_dir", "must name a directory (an empty one would write into the current directory)")
    if c.run.time_limit is not None:
        try:
            limit = parse_duration(c.run.time_limit)
        except ValueError as err:
            raise ConfigError(f"config key 'run.time_limit': {err}") from None
        require(limit > 0, "run.time_limit", f"must be a positive duration, got {c.run.time_limit!r}")
    require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    require(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be a finite number > 0, got {t.lr}")
    require(
        t.lr / max(1 - t.betas[0], 1e-12) < FLOAT32_MAX, "train.lr",
        f"is too large for a float32 update ({t.lr}; Adam's first step is lr / (1 - betas[0]))",
    )
    require(t.weight_decay >= 0 and math.isfinite(t.weight_decay), "train.weight_decay", f"must be finite and >= 0, got {t.weight_decay}")
    check_device(t.device)
    require(
        t.micro_batch_tokens is None or t.micro_batch_tokens >= 1, "train.micro_batch_tokens",
        f"must be >= 1 (tokens per micro-batch) or null, got {t.micro_batch_tokens}",
    )
    _, world, _ = launched_world()
    validate_models(c, world)
    load_reward_functions(c.task.reward_function, c.task.reward_weights)  # each importable: a one-line error now
    for name in c.log.trackers():
        require(name in TRACKERS, "log.report_to", f"names {name!r}; the trackers are {', '.join(TRACKERS)}")
        require(
            importlib.util.find_spec(TRACKERS[name]) is not None, "log.report_to",
            f"names {name}, whose package is not installed here (pip install 'opd[trackers]')",
        )
    require(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    require(
        t.prompts_per_step % t.grad_accum == 0,
        "train.grad_accum",
        f"must divide train.prompts_per_step ({t.prompts_per_step}), got {t.grad_accum}",
    )
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
    validate_engine(c, world)
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
    if c.student.chat_template is not None:
        try:
            chat_template_text(c.student.chat_template)
        except ChatTemplateError as err:
            raise ConfigError(str(err)) from None
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
    require(
        c.teacher.device is None or bool(placed_models(c, method.needs(c))), "teacher.device",
        f"has nothing to place: method '{m.name}' loads no local teacher or reference here (a served teacher runs where its "
        "server does; the self-teacher and a LoRA student's initial weights are the student itself)",
    )


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


def validate_engine(c: Config, world: int) -> None:
    """``sampling.engine`` against what the engine declares (``engines.base.Engine``), then the engine's own keys and
    checks (``Engine.validate``), before any model loads."""
    s = c.sampling
    engine = engine_class(s.engine)
    holders = [name for name, cls in ENGINE_REGISTRY.items() if cls.holds_weights]
    require(s.sync_every >= 1, "sampling.sync_every", f"must be >= 1, got {s.sync_every}")
    require(
        engine.holds_weights or s.sync_every == 1, "sampling.sync_every",
        f"only applies to sampling.engine={' / '.join(holders)} (the {s.engine} engine samples from the model being trained)",
    )
    episodic = issubclass(TASK_REGISTRY[c.task.name].task_class, EpisodicTask)
    if episodic and not engine.takes_stop_strings:
        takers = [name for name, cls in ENGINE_REGISTRY.items() if cls.takes_stop_strings]
        require(
            False, "sampling.engine",
            f"must be {' or '.join(takers)} for task.name={c.task.name} (turns end at stop strings, which the {s.engine} engine does not take yet)",
        )
    lag = s.max_staleness
    require(lag >= 0, "sampling.max_staleness", f"must be >= 0, got {lag}")
    if lag:
        apart = [name for name, cls in ENGINE_REGISTRY.items() if cls.runs_apart]
        require(
            engine.runs_apart, "sampling.max_staleness",
            f"is {lag}, which generates while the trainer trains: that needs an engine in a process of its own "
            f"(sampling.engine={' / '.join(apart)}), and the {s.engine} engine runs in the trainer's",
        )
        require(s.sync_every == 1, "sampling.sync_every", f"must be 1 with sampling.max_staleness={lag} (the lag sets when the engine gets the weights)")
    engine.validate(c, world)
    if s.sync_every > 1:
        for key, every in (("eval.every", c.eval.every), ("checkpoint.every", c.checkpoint.every)):
            require(
                every % s.sync_every == 0, key,
                f"must be a multiple of sampling.sync_every ({s.sync_every}), got {every}: the engine holds the trained "
                "weights only at those steps (evaluation must see them; a resume must restart from them)",
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
    validate_client_settings(te, "teacher", c.train.dist_timeout)
    require(te.concurrency >= 1, "teacher.concurrency", f"must be >= 1, got {te.concurrency}")
    if te.api_key_env:
        require(bool(os.environ.get(te.api_key_env)), "teacher.api_key_env", f"names {te.api_key_env}, which is not set")


def check_device(name: str, key: str = "train.device") -> None:
    """``train.device`` (or ``key``): auto, or a torch device that exists here."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key '{key}' must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), key, f"is {name!r} but CUDA is not available here (use auto or cpu)")
        require(device.index is None or device.index < torch.cuda.device_count(), key, f"is {name!r} but only {torch.cuda.device_count()} CUDA devices exist")


def validate_models(c: Config, world: int) -> None:
    """The attention implementations named exist and are installed; ``teacher.device`` exists and has a local teacher
    to hold. (Whether an architecture has the implementation, and packing, are checked from the model configs before
    any weights load: ``training.assembly``.)"""
    for key, name in (("student.attn_implementation", c.student.attn_implementation), ("teacher.attn_implementation", c.teacher.attn_implementation)):
        if name is not None:
            problem = implementation_problem(name)
            require(problem is None, key, problem or "")
    device = c.teacher.device
    if device is None:
        return
    require(device != "auto", "teacher.device", "must name a device (cpu, cuda:N) or be null (the student's device)")
    check_device(device, "teacher.device")
    require(
        world == 1 or device == "cpu", "teacher.device",
        f"is {device!r}, one device for all {world} ranks; with several ranks each rank's teacher sits on its own GPU (leave it null) or on cpu",
    )


def placed_models(c: Config, needs) -> list[str]:
    """What ``teacher.device`` places: the local teacher and route checkpoints, and a reference loaded from a
    checkpoint (or the student's initial weights loaded again, without LoRA)."""
    te, placed = c.teacher, []
    if needs.teacher and te.path is not None and te.url is None:
        placed.append("teacher.path")
    placed += [f"teacher.routes.{n}" for n, p in te.routes.items() if not is_url(p)]
    ref = needs.reference
    if ref is not None and not is_url(ref) and (ref != "student_init" or not c.student.lora.enabled):
        placed.append(needs.reference_key)
    return placed


def validate_teacher_tokenizer(c: Config, name: str, needs) -> None:
    """``teacher.tokenizer``: shared, or own where the method and the teacher can score spans so far."""
    te = c.teacher
    if te.tokenizer not in ("shared", "own", None):
        require(False, "teacher.tokenizer", f"must be shared or own, got {te.tokenizer!r} (a served model's tokenizer files, "
                                            "which this key once named, are teacher.tokenizer_path)")
    if te.tokenizer != "own":
        return
    if needs.reference and needs.reference != "student_init":
        require(False, needs.reference_key, f"must be student_init with teacher.tokenizer=own, got {needs.reference!r}: "
                                            "another reference model would need the student's tokenizer too, and its spans")
    spans = [n for n, cls in METHOD_REGISTRY.items() if cls.needs(c).spans]
    require(
        needs.spans, "teacher.tokenizer",
        f"is 'own', which works with the methods {', '.join(spans)} so far, not '{name}'",
    )
    if te.url is not None:  # a served teacher: its tokenizer read from a local copy, which the server is checked against
        require(te.tokenizer_path is not None, "teacher.tokenizer_path", "is required with teacher.tokenizer=own and teacher.url: "
                "a local copy of the served teacher's tokenizer splits the text and gives the offsets the spans are cut at")
        require(not needs.full_vocabulary, "teacher.tokenizer", f"is 'own' with a served teacher, which gives sampled-token "
                f"log-probs only: '{name}' compares full distributions (a local teacher, teacher.path, can)")
    served_routes = [name for name, path in te.routes.items() if is_url(path)]
    require(not served_routes, "teacher.tokenizer", f"is 'own', which works with local routes so far, not the served "
                                                    f"teacher.routes.{served_routes[0] if served_routes else ''}")


def validate_needs(c: Config, name: str, needs) -> None:
    """Refuse a config that does not give the method what its ``Needs`` say it uses."""
    if needs.teacher:
        require(
            c.teacher.path is not None or c.teacher.url is not None or bool(c.teacher.routes),
            "teacher.path", f"is required by method '{name}' (or teacher.url: a teacher behind a server)",
        )
    if needs.self_teacher:
        for key, value in (("path", c.teacher.path), ("url", c.teacher.url)):
            require(
                value is None,
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
    validate_teacher_tokenizer(c, name, needs)
    if c.teacher.routes:
        routable = [n for n, cls in METHOD_REGISTRY.items() if cls.needs(c).routable]
        require(needs.routable, "teacher.routes", f"works with the sampled-token methods ({', '.join(routable)}), not '{name}'")
