"""Loading students, teachers and references; LoRA; the teacher/student pairing check."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .sections import LoraConfig
from .world import WORLD_MODELS, world_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be used; the message says which and why."""


class PairingError(ValueError):
    """Teacher and student cannot be trained together as configured."""


def resolve_path(path: str, key: str) -> str:
    """Turn a configured model path into a local directory, refusing anything that needs a download."""
    if path.startswith("world:search/"):
        from .search_world import search_world_file

        try:
            return str(search_world_file(path.removeprefix("world:search/")))
        except ValueError as err:
            raise ModelLoadError(f"{key}: {err}") from None
    if path.startswith("world:"):
        try:
            return str(world_model_path(path.split(":", 1)[1]))
        except ValueError as err:
            raise ModelLoadError(f"{key}: {err}") from None
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{key}: '{path}' is a directory but holds no config.json (not a HF checkpoint)")
        return str(local)
    if local.exists():
        raise ModelLoadError(f"{key}: '{path}' is a file; expected a HF checkpoint directory")
    raise ModelLoadError(
        f"{key}: no model at '{path}' (give a local HF checkpoint directory, or one of world:{', world:'.join(WORLD_MODELS)})"
    )


def load_tokenizer(path: str, key: str = "student.path", trust_remote_code: bool = False):
    directory = resolve_path(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left", trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - rewrap whatever transformers raises, naming the key
        raise ModelLoadError(f"{key}: cannot load a tokenizer from '{directory}': {err}") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{key}: tokenizer at '{directory}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("%s: tokenizer has no pad token; using EOS (%r) for padding", key, tokenizer.eos_token)
    return tokenizer


def load_model_config(path: str, key: str, trust_remote_code: bool = False):
    """The model's config alone (no weights): what the pre-flight pass reads the context length from."""
    from transformers import AutoConfig

    directory = resolve_path(path, key)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{key}: cannot read a model config from '{directory}': {err}") from err


def load_model(path: str, key: str, dtype: str = "float32", trust_remote_code: bool = False, device="cpu"):
    directory = resolve_path(path, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{key}: cannot load a causal LM from '{directory}': {err}") from err
    return model.to(device)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(cfg.target_modules)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except (ValueError, TypeError) as err:  # typically: the target modules match nothing in this model
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelLoadError(
            f"student.lora.target_modules={cfg.target_modules!r} cannot be applied ({' '.join(str(err).split())[:160]}); "
            f"this model's linear layers are: {', '.join(linear)} (or use all-linear)"
        ) from None


REGEX_CHARACTERS = set("*+?[](){}|^$\\")  # not ".": "self_attn.q_proj" is a dotted suffix, not a pattern


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    """What peft is given: "all-linear" and regular expressions as they are; a plain name or comma-separated names
    as a list (peft matches list entries as module-name suffixes, but a string as a regex over the full name)."""
    if isinstance(target_modules, list):
        names = [t.strip() for t in target_modules]
        return "all-linear" if names == ["all-linear"] else names
    if target_modules == "all-linear" or REGEX_CHARACTERS & set(target_modules):
        return target_modules
    return [t.strip() for t in target_modules.split(",") if t.strip()]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- pairing check

PAIRING_SAMPLE = [{"role": "user", "content": "What is 12+30? Think step by step."}]
ROUND_TRIP_TEXT = "12+30=42, so the answer is \\boxed{42}."


def check_pairing(student_tok, teacher_tok, student_model, teacher_model, full_vocab: bool, allow_template_mismatch: bool):
    """Refuse a teacher whose token ids would not mean what the student's mean.

    Checked: vocabulary (size and token→id map), EOS and pad ids, the chat template rendered
    on a sample conversation, and a tokenise/detokenise round trip. Returns the list of
    warnings issued (mismatches under which training stays meaningful).
    """
    problems, notes = [], []
    s_vocab, t_vocab = output_size(student_model), output_size(teacher_model)
    if len(student_tok) > min(s_vocab, t_vocab):
        problems.append(f"the tokenizer has {len(student_tok)} tokens but the {'student' if s_vocab < t_vocab else 'teacher'} "
                        f"outputs only {min(s_vocab, t_vocab)}")
    elif t_vocab < s_vocab and full_vocab:
        problems.append(
            f"the teacher's output layer has fewer rows ({t_vocab}) than the student's ({s_vocab}), so it gives no "
            "probability for the student's extra (padding) ids; a full-vocabulary loss needs the teacher at least as wide"
        )
    tok_problems, tok_notes = tokenizer_problems(student_tok, teacher_tok, allow_template_mismatch)
    return raise_pairing(problems + tok_problems, notes + tok_notes)


def tokenizer_problems(student_tok, teacher_tok, allow_template_mismatch: bool) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of two tokenizers: vocabulary, EOS and pad ids, a round trip, the chat template."""
    problems, notes = [], []
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        problems.append(f"tokenizer vocabularies differ (student {len(student_tok)} tokens, teacher {len(teacher_tok)})")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        problems.append(f"EOS ids differ (student {student_tok.eos_token_id}, teacher {teacher_tok.eos_token_id})")
    if student_tok.pad_token_id != teacher_tok.pad_token_id:
        notes.append(f"pad ids differ (student {student_tok.pad_token_id}, teacher {teacher_tok.pad_token_id}); padding is masked, so this is harmless")
    s_ids = student_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    if s_ids != t_ids:
        problems.append("the two tokenizers split the same text into different ids")
    if student_tok.decode(s_ids) != teacher_tok.decode(s_ids):
        problems.append("the two tokenizers decode the same ids into different text")
    s_template = _render(student_tok)
    t_template = _render(teacher_tok)
    if s_template != t_template:
        message = (
            "chat templates render differently "
            f"(student {s_template!r}, teacher {t_template!r}); the teacher scores prompts in the student's format"
        )
        if allow_template_mismatch:
            notes.append(message)
        else:
            problems.append(message + " (set pairing.allow_chat_template_mismatch=true if that is intended)")
    return problems, notes


def raise_pairing(problems: list[str], notes: list[str]) -> list[str]:
    """Raise ``PairingError`` naming every problem; else warn each note and return the notes."""
    if problems:
        raise PairingError("teacher and student do not pair: " + "; ".join(problems))
    for note in notes:
        warnings.warn(f"teacher/student pairing: {note}", stacklevel=3)
    return notes


def output_size(model) -> int:
    """Rows of the model's output layer (its config's ``vocab_size`` may count more, or fewer, in some families)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None and hasattr(head, "weight") else model.config.vocab_size


def match_output_vocabulary(teacher, student) -> bool:
    """Cut a teacher whose output layer is padded beyond the student's (a family whose larger members have more
    embedding rows) to the student's rows, in memory: ids past the tokenizer's are padding that neither model is
    given as input, so the teacher's distribution over the ids both can emit is kept, renormalised over them.
    Returns whether it cut."""
    t_rows, s_rows = output_size(teacher), output_size(student)
    if t_rows <= s_rows:
        return False
    teacher.resize_token_embeddings(s_rows)
    log.info("teacher output layer cut from %d to the student's %d rows (the ids past the tokenizer's are padding)", t_rows, s_rows)
    return True


def _render(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(PAIRING_SAMPLE, tokenize=False, add_generation_prompt=True)
