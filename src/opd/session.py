"""Set-up of a run: the task, the student (with LoRA), teachers, reference, judge and samplers, as one ``Session``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import Config, needs_reference, needs_teacher
from .judges import HTTPJudge, ModelJudge, ProgrammaticJudge
from .methods import Session
from .models import apply_lora, check_pairing, eos_token_ids, freeze, load_model, load_tokenizer
from .profiling import PhaseTimer
from .rollout import HFSampler
from .tasks import ArithmeticTask, MathTask, Task
from .teachers import EmaTeacher, ModelTeacher, RoutedTeacher


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""

def build_task(cfg: Config) -> Task:
    t = cfg.task
    if t.name == "arithmetic":
        return ArithmeticTask(min_digits=t.min_digits, max_digits=t.max_digits, eval_size=t.eval_size, eval_seed=t.eval_seed)
    return MathTask(
        path=t.path,
        eval_path=t.eval_path,
        eval_size=t.eval_size,
        problem_field=t.problem_field,
        answer_field=t.answer_field,
        solution_field=t.solution_field,
        teacher_field=t.teacher_field,
        seed=cfg.run.seed,
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_factory(cfg: Config, device: torch.device):
    precision = cfg.train.precision
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def build_session(cfg: Config) -> Session:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    task = build_task(cfg)
    autocast = autocast_factory(cfg, device)
    st = cfg.student
    tokenizer = load_tokenizer(st.path, "student.path", st.trust_remote_code)
    student = load_model(st.path, "student.path", st.dtype, st.trust_remote_code, device)
    if st.lora.enabled:
        student = apply_lora(student, st.lora)
    student.train()
    teacher = teacher_sampler = None
    if needs_teacher(cfg) and cfg.teacher.path is not None:
        teacher_model = load_paired(cfg, cfg.teacher.path, "teacher.path", tokenizer, student, device)
        teacher = ModelTeacher(teacher_model, autocast)
        teacher_sampler = HFSampler(teacher_model, tokenizer, eos_token_ids(teacher_model, tokenizer), autocast)
    if cfg.teacher.routes:
        routes = {
            name: ModelTeacher(load_paired(cfg, path, f"teacher.routes.{name}", tokenizer, student, device), autocast)
            for name, path in cfg.teacher.routes.items()
        }
        teacher = RoutedTeacher(routes, default=teacher)
    if cfg.method.name == "opsd":
        teacher = self_teacher(cfg, student, autocast, device)
    reference = build_reference(cfg, tokenizer, student, autocast, device) if needs_reference(cfg) else None
    max_positions = getattr(student.config, "max_position_embeddings", None)
    max_prompt = max_positions - cfg.sampling.max_new_tokens if max_positions else None
    if max_prompt is not None and max_prompt < 1:
        raise TrainingError(
            f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt in the student's "
            f"{max_positions}-token context"
        )
    sampler = HFSampler(student, tokenizer, eos_token_ids(student, tokenizer), autocast)
    judge = build_judge(cfg, teacher, device) if cfg.method.name == "ovd" else None
    return Session(cfg, task, tokenizer, student, sampler, teacher, teacher_sampler, reference, autocast, device, max_prompt, judge, PhaseTimer(device))


def load_paired(cfg: Config, path: str, key: str, tokenizer, student, device):
    """Load a teacher-like model and refuse it unless it pairs with the student's tokenizer."""
    te = cfg.teacher
    other_tok = load_tokenizer(path, key, te.trust_remote_code)
    model = load_model(path, key, te.dtype, te.trust_remote_code, device)
    check_pairing(
        tokenizer,
        other_tok,
        student,
        model,
        full_vocab=cfg.method.name == "gkd",
        allow_template_mismatch=cfg.pairing.allow_chat_template_mismatch,
    )
    return model


def build_judge(cfg: Config, teacher: ModelTeacher | None, device):
    """OVD's verbal judge: programmatic step checker, a local model (default the teacher), or an HTTP endpoint."""
    o = cfg.method.ovd
    if o.judge == "programmatic":
        return ProgrammaticJudge()
    if o.judge == "http":
        h = o.http
        return HTTPJudge(h.url, h.model, h.api_key_env, h.timeout, h.retries, h.backoff)
    path = o.judge_path or cfg.teacher.path
    judge_tok = load_tokenizer(path, "method.ovd.judge_path")
    if path == cfg.teacher.path and isinstance(teacher, ModelTeacher):
        return ModelJudge(teacher.model, judge_tok)  # the teacher judges: no second copy
    return ModelJudge(freeze(load_model(path, "method.ovd.judge_path", cfg.teacher.dtype, device=device)), judge_tok)


def initial_student(cfg: Config, student, autocast, device) -> ModelTeacher:
    """The student's initial weights: with LoRA the student with adapters disabled, else a frozen copy."""
    st = cfg.student
    if st.lora.enabled:
        return ModelTeacher(student, autocast, freeze=False, disable_adapters=True)
    return ModelTeacher(load_model(st.path, "student.path", st.dtype, st.trust_remote_code, device), autocast)


def self_teacher(cfg: Config, student, autocast, device) -> ModelTeacher:
    """OPSD's teacher: the student itself with fixed (initial), EMA or current weights."""
    o = cfg.method.opsd
    if o.teacher_weights == "fixed":
        return initial_student(cfg, student, autocast, device)
    if o.teacher_weights == "ema":
        return EmaTeacher(student, o.ema_decay, autocast)
    return ModelTeacher(student, autocast, freeze=False)


def build_reference(cfg: Config, tokenizer, student, autocast, device):
    """π_ref: the student's initial weights or a given checkpoint (which must pair with the student)."""
    path = cfg.method.gopd.reference if cfg.method.name == "gopd" else "student_init"
    if path == "student_init":
        return initial_student(cfg, student, autocast, device)
    return ModelTeacher(load_paired(cfg, path, "method.gopd.reference", tokenizer, student, device), autocast)
