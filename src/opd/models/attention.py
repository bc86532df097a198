"""Which attention implementation a model runs with (``student.attn_implementation``, ``teacher.attn_implementation``)
and whether a micro-batch's rows may be packed into one sequence (``train.packing``), decided from names and model
configs alone, so that a wrong choice is one line before any weights load (docs/performance.md).

Packing concatenates a micro-batch's rows and gives each row its own position ids starting at 0, with no attention
mask. transformers (5.x) turns such position ids into row boundaries for the implementations in
``PACKING_IMPLEMENTATIONS``: eager, sdpa and flex attention get a block-diagonal causal mask, the flash-attention
kernels per-row sequence lengths. A layer that is not attention — linear attention, a state-space or recurrent
block, a short convolution — carries its state across the boundary instead, so such models are refused.
"""

from __future__ import annotations

import importlib.util

# implementations whose masks or kernels honour packed rows' position ids (transformers' masking_utils)
PACKING_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # config.layer_types entries
# families whose layers are (partly) recurrent, linear-attention or convolutional, even where no layer_types say so
RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "bamba", "zamba", "zamba2", "rwkv", "recurrent_gemma",
    "xlstm", "lfm2", "lfm2_moe", "granitemoehybrid", "nemotron_h", "qwen3_next", "minimax", "plamo2",
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
    return None
