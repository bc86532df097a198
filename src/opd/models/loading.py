"""Loading students, teachers and references from local checkpoints (or ``world:…`` names); LoRA; output-layer sizes;
the context length a model states."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config.objects import import_object, is_held
from ..config.sections import LoraConfig
from ..services.hub import cache_location, cached_snapshot, looks_like_hub_id
from ..worlds.locate import WORLDS, world_part
from .prompts import chat_template_text

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be used; the message says which and why."""


def resolve_path(path: str, key: str) -> str:
    """Turn a configured model path into a local directory, refusing anything that needs a download: a checkpoint
    directory, ``world:…``, a Hub repo id that the local Hugging Face cache holds (never fetched), or a model
    object given to the Python API (the directory it was loaded from)."""
    if is_held(path):
        return resolve_path(str(held_model(path, key).name_or_path or ""), key)
    try:
        world = world_part(path)
    except ValueError as err:
        raise ModelLoadError(f"{key}: {err}") from None
    if world is not None:
        return str(world)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{key}: '{path}' is a directory but holds no config.json (not a HF checkpoint)")
        return str(local)
    if local.exists():
        raise ModelLoadError(f"{key}: '{path}' is a file; expected a HF checkpoint directory")
    if looks_like_hub_id(path):
        return cached_model(path, key)
    raise ModelLoadError(
        f"{key}: no model at '{path}' (give a local HF checkpoint directory, a Hub repo id in the local cache, or one of "
        f"world:{', world:'.join(WORLDS['arithmetic'].parts)})"
    )


def cached_model(repo_id: str, key: str) -> str:
    """The local Hugging Face cache's snapshot of model ``repo_id`` (its ``main`` revision), never downloading."""
    directory = cached_snapshot(repo_id)
    if directory is None:
        raise ModelLoadError(
            f"{key}: no model at '{repo_id}': not a local directory, and the Hugging Face cache ({cache_location()}) "
            f"holds no snapshot of it; opd never downloads: fetch it beforehand (huggingface-cli download {repo_id})"
        )
    if not (Path(directory) / "config.json").is_file():
        raise ModelLoadError(f"{key}: the cached snapshot of '{repo_id}' ({directory}) holds no config.json (not a HF checkpoint)")
    return directory


def held_model(path: str, key: str) -> torch.nn.Module:
    """The model object given to the Python API under ``path`` (``config.objects``)."""
    from transformers import PreTrainedModel

    model = import_object(path, key)
    if not isinstance(model, PreTrainedModel):
        raise ModelLoadError(f"{key}: the object given for it is a {type(model).__name__}, not a transformers causal LM")
    return model


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


def student_tokenizer(student_cfg):
    """The student's tokenizer, with ``student.chat_template`` in place of its own template where one is given
    (saved with every checkpoint from then on, so ``final/`` renders prompts the way training did)."""
    tokenizer = load_tokenizer(student_cfg.path, "student.path", student_cfg.trust_remote_code)
    if student_cfg.chat_template is not None:
        tokenizer.chat_template = chat_template_text(student_cfg.chat_template)
    return tokenizer


def load_model_config(path: str, key: str, trust_remote_code: bool = False):
    """The model's config alone (no weights): what the pre-flight pass reads the context length from."""
    from transformers import AutoConfig

    if is_held(path):
        return held_model(path, key).config
    directory = resolve_path(path, key)
    check_model_type(directory, key, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{key}: cannot read a model config from '{directory}': {err}") from err


def load_model(path: str, key: str, dtype: str = "float32", trust_remote_code: bool = False, device="cpu", attn_implementation: str | None = None):
    """A causal LM from a local checkpoint on ``device``; ``attn_implementation`` as transformers takes it (None: its choice).
    A model object given to the Python API is used as it is (its own dtype), moved to ``device``."""
    if is_held(path):
        return check_finite(held_model(path, key).to(device), key, None)
    directory = resolve_path(path, key)
    check_model_type(directory, key, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True, attn_implementation=attn_implementation,
        )
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{key}: cannot load a causal LM from '{directory}': {err}") from err
    return check_finite(model.to(device), key, directory)


def check_finite(model: torch.nn.Module, key: str, directory: str | None) -> torch.nn.Module:
    """Refuse a model with a NaN or infinite weight (a checkpoint of a run that diverged): sampling from it would fail
    deep inside torch. One pass over the weights, on the device they were loaded to."""
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        where = f" ({weight_file(directory, bad[0])})" if directory else ""
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelLoadError(f"{key}: the weights hold NaN or infinite values: {bad[0]}{where}{more} (a checkpoint of a run that diverged?)")
    return model


def weight_file(directory: str, name: str) -> str:
    """The safetensors file of ``directory`` that holds tensor ``name`` (its index says, when it is sharded)."""
    import json

    index = Path(directory) / "model.safetensors.index.json"
    if index.is_file():
        try:
            return str(Path(directory) / json.loads(index.read_text())["weight_map"][name])
        except (ValueError, KeyError):
            pass
    return str(Path(directory) / "model.safetensors")


def check_model_type(directory: str, key: str, trust_remote_code: bool) -> None:
    """Refuse, in one line, a ``config.json`` whose ``model_type`` this transformers does not know (a newer family, or a
    model that ships its own code), before transformers' own several-line advice."""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers says what is wrong with the file itself
    if trust_remote_code or not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return
    owner = "student" if key.startswith("student") else "teacher"
    raise ModelLoadError(
        f"{key}: '{directory}/config.json' names model_type '{model_type}', which transformers {transformers.__version__} does "
        f"not know: a newer transformers may, or, for a model that ships its own code, {owner}.trust_remote_code=true"
    )


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each decoder layer in the backward (non-reentrant torch checkpointing) or stop doing so; active
    only in training mode with gradients on. transformers >= 5.2x names it activation checkpointing, earlier
    releases gradient checkpointing."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


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


def context_length(model_config, tokenizer) -> int | None:
    """The model's context from its config (``max_position_embeddings``), else the tokenizer's stated maximum."""
    n = getattr(model_config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**8 else None
