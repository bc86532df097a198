"""Which attention implementation a model runs with (``student.attn_implementation``, ``teacher.attn_implementation``)
and whether a micro-batch's rows may be packed into one sequence (``train.packing``), decided from names and model
configs alone, so that a wrong choice is one line before any weights load (docs/performance.md).

Packing puts a micro-batch's rows side by side and gives each row its own position ids starting at 0, with no
attention mask. transformers (5.x) turns such position ids into row boundaries for the implementations in
``PACKING_IMPLEMENTATIONS`` — eager, sdpa and flex attention get a block-diagonal causal mask, the flash-attention
kernels per-row sequence lengths (for a batch of one sequence: ``models.scoring.packed_forward``) — but only in
models whose forward hands the position ids to transformers' mask builder (``passes_positions_to_mask``: Llama,
Qwen2/3, Mistral, Gemma, …; not OPT, Bloom, GPT-2, which build their masks without them). A layer that is not
attention — linear attention, a state-space or recurrent block, a short convolution — carries its state across
the boundary instead. Models that would let rows see each other are refused.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys

# implementations whose masks or kernels honour packed rows' position ids (transformers' masking_utils)
PACKING_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # config.layer_types entries
# families whose layers are (partly) recurrent, linear-attention or convolutional, even where no layer_types say so
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "bamba", "zamba", "zamba2", "rwkv", "recurrent_gemma",
    "xlstm", "lfm2", "lfm2_moe", "granitemoehybrid", "nemotron_h", "qwen3_next", "minimax", "plamo2", "kimi_linear",
    "olmo_hybrid", "bailing_hybrid",
})
# the package a kernel-backed implementation needs, importable (transformers says so only when the model loads)
KERNEL_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface", "flash_attention_4": "flash_attn.cute"}
# the model-class flag that says an architecture has the implementation
ARCHITECTURE_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def known_implementations() -> list[str]:
    """Every implementation transformers has registered (eager is built in)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def implementation_problem(name: str) -> str | None:
    """Why ``name`` cannot be used on this machine (unknown, or its kernel package is not installed), else None."""
    known = known_implementations()
    if name not in known:
        return f"must be one of {', '.join(known)} (or null: transformers' choice), got {name!r}"
    package = next((p for impl, p in KERNEL_PACKAGES.items() if name.startswith(impl)), None)
    if package is not None and _missing(package):
        return f"is {name!r}, which needs the {package.split('.')[0]} package; it is not installed here (use sdpa)"
    return None


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package that is absent
        return True


def architecture_problem(model_config, name: str) -> str | None:
    """Why this architecture does not have implementation ``name`` (from its model class's flags), else None."""
    cls = model_class(model_config)
    if cls is None:  # remote code or an unmapped config: transformers checks it when the model loads
        return None
    if name.startswith("flash_attention"):
        flag = "_supports_flash_attn"
    else:
        flag = ARCHITECTURE_FLAGS.get(name.split("|")[-1])
    if flag is not None and not getattr(cls, flag, False):
        return f"is {name!r}, which {cls.__name__} does not support"
    return None


def model_class(model_config):
    """The transformers causal-LM class of ``model_config``, without building it; None when transformers maps none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except (KeyError, ValueError):
        return None


def resolved_implementation(model_config, name: str | None) -> str:
    """What the model will run: ``name``, or transformers' default (sdpa where the architecture has it, else eager)."""
    if name is not None:
        return name
    cls = model_class(model_config)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def packing_problem(model_config, name: str | None, trust_remote_code: bool) -> str | None:
    """Why this model's rows cannot be packed into one sequence (its attention or its layers), else None."""
    implementation = resolved_implementation(model_config, name)
    if implementation not in PACKING_IMPLEMENTATIONS:
        return f"attention implementation {implementation!r} does not keep packed rows apart (use one of {', '.join(PACKING_IMPLEMENTATIONS)})"
    if trust_remote_code:
        return "a remote-code model's attention is not transformers' own, which is what keeps packed rows apart"
    model_type = getattr(model_config, "model_type", "")
    others = sorted({t for t in getattr(model_config, "layer_types", None) or () if t not in ATTENTION_LAYER_TYPES})
    if others or model_type in RECURRENT_MODEL_TYPES:
        what = ", ".join(others) if others else f"{model_type}'s recurrent"
        return f"{model_type} has {what} layers, which carry state across packed rows' boundaries"
    cls = model_class(model_config)
    if cls is None or not passes_positions_to_mask(cls):
        name = cls.__name__ if cls is not None else model_type or "this model"
        return f"{name} builds its attention mask without the position ids, so packed rows would attend to each other"
    return None


# the ways transformers' modeling code hands the position ids to its mask builders: as a keyword of the builder
# (or of ``mask_function``, the builder picked by sliding window), or in the mask_kwargs dict the layer types share
MASK_WITH_POSITIONS = re.compile(
    r"(?:create_(?:sliding_window_|chunked_)?causal_mask|mask_function)\([^()]*position_ids=position_ids"
    r"|mask_kwargs\s*=\s*\{[^{}]*[\"']position_ids[\"']:\s*position_ids",
    re.S,
)


def passes_positions_to_mask(cls) -> bool:
    """Whether the modeling code of ``cls`` hands ``position_ids`` to transformers' causal-mask builder (what turns
    packed rows' position restarts into boundaries), read from its module's source."""
    module = sys.modules.get(cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return bool(MASK_WITH_POSITIONS.search(source))
