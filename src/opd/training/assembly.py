"""Set-up of a run: the task, the student (with LoRA), teachers, reference, judge and samplers, as one ``Session``.

What to load is read from the method's ``Needs``; the student's sampler is built by the engine
``sampling.engine`` names (``engines/``). Nothing here tests a method's or an engine's name.
``build_session`` sets up a training run; ``build_eval_session`` the same student, task and engine
for ``opd eval`` (no teacher). Every row of the task is checked against the context before any
model loads (``preflight``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import torch

from ..engines.base import Sampler, engine_class
from ..engines.hf import HFSampler
from ..engines.served import is_url
from ..methods.base import Method, Needs, Session, create_method
from ..models.attention import architecture_problem, model_class, packing_problem
from ..models.loading import (
    apply_lora,
    context_length,
    eos_token_ids,
    load_model,
    load_model_config,
    load_tokenizer,
    match_output_vocabulary,
    output_size,
    set_activation_checkpointing,
    student_tokenizer,
)
from ..models.pairing import PairingError, check_own_tokenizer, check_pairing
from ..models.prompts import render_prompt
from ..parallel.ranks import SINGLE, Ranks
from ..parallel.sharding import shard_model
from ..tasks.reward_functions import build_graded_task as build_task
from ..objectives.cross_vocab import match_vocabularies, project_vocabularies
from ..teachers.cross_tokenizer import CrossTokenizerTeacher, reply_end_ids
from ..teachers.model import ModelTeacher, initial_student
from ..teachers.routed import RoutedTeacher
from ..teachers.served import served_teacher
from .errors import TrainingError
from .preflight import check_task_data
from .profiling import PhaseTimer

log = logging.getLogger(__name__)


def pick_device(name: str, ranks: Ranks = SINGLE) -> torch.device:
    """``train.device`` as a torch device (config validation has refused one this machine does not have); with
    several ranks, ``auto`` and ``cuda`` mean this rank's GPU (``cuda:LOCAL_RANK``)."""
    if ranks.several and (name == "auto" or name == "cuda") and ranks.device.type == "cuda":
        return ranks.device
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


def autocast_factory(cfg, device: torch.device):
    precision = cfg.train.precision
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def build_session(cfg, ranks: Ranks = SINGLE) -> Session:
    """Everything a training run's steps read, loaded and checked: the data first, then the student, its teachers
    (each pairing-checked), reference, judge and samplers."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method = create_method(cfg)
    needs: Needs = method.needs(cfg)
    device = pick_device(cfg.train.device, ranks)
    task = build_task(cfg.task, cfg.run.seed)
    autocast = autocast_factory(cfg, device)
    st = cfg.student
    tokenizer = student_tokenizer(st)
    student_config = load_model_config(st.path, "student.path", st.trust_remote_code)
    context = context_length(student_config, tokenizer)
    served = connect_served(cfg, needs, tokenizer, getattr(student_config, "vocab_size", None) or len(tokenizer), device)
    own = cfg.teacher.tokenizer == "own"  # a teacher with its own tokenizer counts its context in its own tokens
    context = min_context(context, [t.served.context - 1 for key, (t, _) in served.items() if t.served.context
                                    and not (own and key == "teacher.url")])  # +1 scored
    teacher_configs = local_teacher_configs(cfg, needs)
    check_model_options(cfg, student_config, teacher_configs)
    # (it cuts the spans past its context: CrossTokenizerTeacher)
    context = min_context(context, [context_length(c, tokenizer) for key, c in teacher_configs.items()
                                    if not (own and (key == "teacher.path" or key.startswith("teacher.routes.")))])
    require_prompt_room(cfg, context)
    data_report = check_task_data(task, tokenizer, needs, cfg, context)  # before any model is loaded
    student = load_student(cfg, device, ranks)
    for key, (served_model, _) in served.items():  # top-k ids must index the student's output layer itself
        if not (own and key == "teacher.url"):  # (not a teacher that reads text: its ids are its own)
            served_model.vocab_size = output_size(student)
    teacher_device = torch.device(cfg.teacher.device) if cfg.teacher.device else device
    teacher, teacher_sampler = build_teachers(cfg, needs, method, served, tokenizer, student, autocast, teacher_device, task)
    reference = None
    if needs.reference:
        reference = served[needs.reference_key][0] if needs.reference_key in served else build_reference(cfg, needs, tokenizer, student, autocast, teacher_device)
    sampler = student_sampler(cfg, student, tokenizer, autocast, device, context)
    judge = method.make_judge(task, teacher, device) if needs.judge else None
    return Session(
        cfg, method, task, tokenizer, student, sampler, teacher, teacher_sampler, reference, autocast, device, PhaseTimer(device),
        context, judge, data_report, ranks=ranks,
    )


def build_eval_session(cfg) -> Session:
    """What ``opd eval`` needs, set up as a training run's is: the task (its evaluation rows checked against the
    context before the model loads), the student and its sampler from ``sampling.engine``; no teacher."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    task = build_task(cfg.task, cfg.run.seed)
    st = cfg.student
    tokenizer = student_tokenizer(st)
    context = context_length(load_model_config(st.path, "student.path", st.trust_remote_code), tokenizer)
    require_prompt_room(cfg, context)
    data_report = check_task_data(task, tokenizer, Needs(), cfg, context, splits=("eval",))  # before the model is loaded
    model = load_model(st.path, "student.path", st.dtype, st.trust_remote_code, device)
    autocast = autocast_factory(cfg, device)
    sampler = student_sampler(cfg, model, tokenizer, autocast, device, context)
    return Session(
        cfg, create_method(cfg), task, tokenizer, model, sampler, None, None, None, autocast, device, PhaseTimer(device), context,
        data_report=data_report,
    )


def require_prompt_room(cfg, context: int | None) -> None:
    if context is not None and context - cfg.sampling.max_new_tokens < 1:
        raise TrainingError(
            f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt in the "
            f"{context}-token context (the shortest of the student's and its teachers')"
        )


def load_student(cfg, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """The student in training mode, with LoRA where asked, rank 0's weights on every rank, sharded where asked."""
    st = cfg.student
    student = load_model(st.path, "student.path", st.dtype, st.trust_remote_code, device, st.attn_implementation)
    if cfg.train.gradient_checkpointing:  # each decoder layer recomputed in the backward; only in training mode
        set_activation_checkpointing(student, True)
    if st.lora.enabled:
        student = apply_lora(student, st.lora)
    student.train()
    ranks.broadcast_parameters(student)  # every rank starts from rank 0's weights (before anything copies them)
    if cfg.train.sharding == "fsdp" and ranks.several:
        held, total = shard_model(student, ranks.device, ranks.world_size)  # before the teachers that share its parameters
        log.info("train.sharding=fsdp: rank %d holds %d of the student's %d parameters (and their gradients and Adam state)", ranks.rank, held, total)
    return student


def build_teachers(cfg, needs: Needs, method: Method, served: dict, tokenizer, student, autocast, device, task=None):
    """``(teacher, teacher_sampler)``: a served or local teacher (its sampler for demonstrations and its evaluation),
    routes by example, or the student as its own teacher (``Method.make_teacher``)."""
    teacher = teacher_sampler = None
    if needs.teacher and "teacher.url" in served and cfg.teacher.tokenizer == "own":
        teacher = own_tokenizer_teacher(cfg, needs, task, tokenizer, student, autocast, device, cfg.teacher.tokenizer_path,
                                        "teacher.tokenizer_path", scorer=served["teacher.url"][0])
    elif needs.teacher and "teacher.url" in served:
        teacher, teacher_sampler = served["teacher.url"]
    elif needs.teacher and cfg.teacher.path is not None and cfg.teacher.tokenizer == "own":
        teacher = own_tokenizer_teacher(cfg, needs, task, tokenizer, student, autocast, device)
    elif needs.teacher and cfg.teacher.path is not None:
        teacher_model = load_paired(cfg, needs, cfg.teacher.path, "teacher.path", tokenizer, student, device)
        teacher = ModelTeacher(teacher_model, autocast, packed=cfg.train.packing)
        teacher_sampler = HFSampler(teacher_model, tokenizer, eos_token_ids(teacher_model, tokenizer), autocast)
    if cfg.teacher.routes and cfg.teacher.tokenizer == "own":  # each route reads the text in its own tokenizer
        routes = {name: own_tokenizer_teacher(cfg, needs, task, tokenizer, student, autocast, device, path, f"teacher.routes.{name}")
                  for name, path in cfg.teacher.routes.items()}
        teacher = RoutedTeacher(routes, default=teacher)
    elif cfg.teacher.routes:
        routes = {
            name: served[f"teacher.routes.{name}"][0] if f"teacher.routes.{name}" in served
            else ModelTeacher(load_paired(cfg, needs, path, f"teacher.routes.{name}", tokenizer, student, device), autocast, packed=cfg.train.packing)
            for name, path in cfg.teacher.routes.items()
        }
        teacher = RoutedTeacher(routes, default=teacher)
    if needs.self_teacher:
        teacher = method.make_teacher(student, autocast, device)
    return teacher, teacher_sampler


def own_tokenizer_teacher(cfg, needs: Needs, task, tokenizer, student, autocast, device, path: str | None = None,
                          key: str = "teacher.path", scorer=None) -> CrossTokenizerTeacher:
    """``teacher.tokenizer=own``: the teacher at ``path`` (``teacher.path`` unless a route's) with its own tokenizer,
    which must give character offsets, an EOS and a chat template (``models.pairing.check_own_tokenizer``). ``scorer``:
    a served teacher (``ServedTeacher``) that scores the teacher's tokens, ``path`` then being the local copy of its
    tokenizer. It has no sampler: its demonstrations and its own evaluation would need prompts in its tokenizer, which
    the loop does not make yet."""
    te = cfg.teacher
    path = te.path if path is None else path
    teacher_tok = load_tokenizer(path, key, te.trust_remote_code)
    check_own_tokenizer(teacher_tok, key)
    example = task.sample_train(1, random.Random(0))[0]
    try:  # a template that refuses this task's turns (a system prompt, say) fails here, not at the first step
        render_prompt(teacher_tok, task.messages(example), cfg.task.chat_template_kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the template raised, in one line
        raise PairingError(f"{key}: the teacher's own chat template (teacher.tokenizer=own) cannot render this task's "
                           f"prompts: {type(err).__name__}: {err}") from None
    if teacher_tok.get_vocab() == tokenizer.get_vocab():
        log.info("teacher.tokenizer=own with a teacher whose vocabulary is the student's: every span will be one token")
    if cfg.eval.teacher:
        log.info("teacher.tokenizer=own: the teacher is not evaluated on its own (its sampler would need prompts in its tokenizer)")
    if scorer is not None:
        context = scorer.served.context - 1 if scorer.served.context else None  # +1: the server generates one token
        return CrossTokenizerTeacher(scorer, tokenizer, teacher_tok, task.messages, cfg.task.chat_template_kwargs,
                                     eos_token_ids(student, tokenizer), context)
    model = load_model(path, key, te.dtype, te.trust_remote_code, device, te.attn_implementation)
    teacher = CrossTokenizerTeacher(
        ModelTeacher(model, autocast, packed=cfg.train.packing), tokenizer, teacher_tok, task.messages,
        cfg.task.chat_template_kwargs, eos_token_ids(student, tokenizer), context_length(model.config, teacher_tok),
    )
    if needs.full_vocabulary:  # GKD across vocabularies (objectives.cross_vocab): how the two relate
        # the teacher's reply end stands for the token the student's own template closes a reply with (Qwen's
        # <|im_end|>, not its <|endoftext|>), where that is one of the ids that end the student's turn
        student_end = reply_end_ids(tokenizer, cfg.task.chat_template_kwargs)[0]
        student_end = student_end if student_end in teacher.student_eos else tokenizer.eos_token_id
        ends = [(student_end, teacher.teacher_end[0])] if len(teacher.teacher_end) == 1 else []
        sizes = (output_size(student), output_size(model))
        if cfg.method.gkd.cross_vocab == "hybrid":  # (GKD is the one full-vocabulary method a teacher of its own reads)
            teacher.match = match_vocabularies(tokenizer, teacher_tok, *sizes, tuple(ends))
            log.info("teacher.tokenizer=own: %d tokens write the same text in both vocabularies (student %d, teacher %d)",
                     len(teacher.match.student_M), *sizes)
        else:
            teacher.match = project_vocabularies(tokenizer, teacher_tok, *sizes, tuple(ends))
            log.info("teacher.tokenizer=own: %d of the teacher's %d tokens map to the student token their text starts with",
                     int((teacher.match.student_of_W >= 0).sum()), sizes[1])
    return teacher


def connect_served(cfg, needs: Needs, tokenizer, vocab_size: int, device) -> dict:
    """``{config key: (ServedTeacher, ServedSampler)}`` for every served model the run uses, each pairing-checked
    against the student."""
    te = cfg.teacher
    urls = {}
    if needs.teacher and te.url:
        urls["teacher.url"] = te.url
    if needs.teacher or needs.routable:
        urls.update({f"teacher.routes.{name}": u for name, u in te.routes.items() if is_url(u)})
    if needs.reference and is_url(needs.reference):
        urls[needs.reference_key] = needs.reference
    eos = [tokenizer.eos_token_id]
    own = {"teacher.url"} if te.tokenizer == "own" else set()  # read through its own tokenizer's local copy
    return {key: served_teacher(te, url, key, tokenizer, vocab_size, eos, cfg.pairing, device, key in own) for key, url in urls.items()}


def min_context(context: int | None, others) -> int | None:
    """The shortest of the known context lengths (None: unknown)."""
    known = [c for c in [context, *others] if c]
    return min(known) if known else None


def local_teacher_configs(cfg, needs: Needs) -> dict:
    """``{config key: model config}`` of the local teacher, route and reference checkpoints (read without weights:
    a teacher shorter than the student limits prompts, and each is checked by ``check_model_options``)."""
    te = cfg.teacher
    paths = {"teacher.path": te.path} if needs.teacher and te.path else {}
    paths.update({f"teacher.routes.{n}": p for n, p in te.routes.items() if not is_url(p)})
    if needs.reference and needs.reference != "student_init" and not is_url(needs.reference):
        paths[needs.reference_key] = needs.reference
    return {key: load_model_config(path, key, te.trust_remote_code) for key, path in paths.items()}


def check_model_options(cfg, student_config, teacher_configs: dict) -> None:
    """What the run asks of each local model's architecture, from its config alone: the attention implementation
    named, packing (``train.packing``: the student and every model that scores a micro-batch), and gradient
    checkpointing. One line naming the key, before any weights load."""
    st, te = cfg.student, cfg.teacher
    models = [("student", st, student_config)] + [(key, te, config) for key, config in teacher_configs.items()]
    for who, section, config in models:
        key = "student.attn_implementation" if section is st else "teacher.attn_implementation"
        if section.attn_implementation is not None:
            problem = architecture_problem(config, section.attn_implementation)
            if problem:
                raise TrainingError(f"config key '{key}' {problem}" + ("" if section is st else f" (the model of {who})"))
        if cfg.train.packing:
            problem = packing_problem(config, section.attn_implementation, section.trust_remote_code)
            if problem:
                raise TrainingError(f"config key 'train.packing' cannot pack rows for the {who} model: {problem}")
    if cfg.train.gradient_checkpointing:
        cls = model_class(student_config)
        if cls is not None and not getattr(cls, "supports_gradient_checkpointing", False):
            raise TrainingError(f"config key 'train.gradient_checkpointing': {cls.__name__} does not support gradient checkpointing")


def student_sampler(cfg, student, tokenizer, autocast, device, context: int | None) -> Sampler:
    """The student's sampler, built by the engine ``sampling.engine`` names."""
    eos = eos_token_ids(student, tokenizer)
    return engine_class(cfg.sampling.engine).build(cfg, student, tokenizer, eos, autocast, device, context)


def load_paired(cfg, needs: Needs, path: str, key: str, tokenizer, student, device):
    """Load a teacher-like model and refuse it unless it pairs with the student's tokenizer."""
    te = cfg.teacher
    other_tok = load_tokenizer(path, key, te.trust_remote_code)
    model = load_model(path, key, te.dtype, te.trust_remote_code, device, te.attn_implementation)
    check_pairing(
        tokenizer,
        other_tok,
        student,
        model,
        full_vocab=needs.full_vocabulary,
        pairing=cfg.pairing,
    )
    match_output_vocabulary(model, student)
    return model


def build_reference(cfg, needs: Needs, tokenizer, student, autocast, device):
    """π_ref: the student's initial weights or a given checkpoint (which must pair with the student)."""
    if needs.reference == "student_init":
        return initial_student(cfg.student, student, autocast, device, cfg.train.packing)
    model = load_paired(cfg, needs, needs.reference, needs.reference_key, tokenizer, student, device)
    return ModelTeacher(model, autocast, packed=cfg.train.packing)

