"""Weights from the trainer to an engine in another process, through files (the transport that runs on any machine).

The trainer writes the student's weights under their checkpoint names as safetensors files of at most
``chunk_mb`` each, into a directory both processes see (``/dev/shm`` by default: memory, not disk), and the
engine's workers read them back with its in-place reload (``WeightFiles.opd_load_weights``, the vLLM worker
extension of ``engines.vllm_server``). Only one chunk is held in the trainer's memory beside the model at a
time; the directory holds one copy of the weights, in the engine's dtype, until the engine has read it.

vLLM's own weight-transfer backends (NCCL between GPUs, CUDA IPC on one GPU) need CUDA; this one needs a
shared filesystem only (docs/engines.md, "A student engine in its own process").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

PART = "part-{:05d}.safetensors"


def write_weight_files(weights: Iterable[tuple[str, torch.Tensor]], directory: str | os.PathLike, dtype: torch.dtype | None,
                       chunk_mb: float) -> tuple[list[Path], int]:
    """Write ``(name, tensor)`` pairs into ``directory`` as safetensors parts of at most ``chunk_mb`` MiB (a tensor
    larger than that is a part of its own), floating-point tensors cast to ``dtype`` (None: as they are);
    a write that fails stops the writing, not the consuming (a sharded model's other ranks still find this one in
    each gather), and is raised at the end. Returns the parts, in order, and the bytes written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    limit = max(1, int(chunk_mb * (1 << 20)))
    parts: list[Path] = []
    chunk: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal chunk, size
        if chunk:
            path = directory / PART.format(len(parts))
            save_file(chunk, str(path))
            parts.append(path)
        chunk, size = {}, 0

    pairs = iter(weights)
    try:
        for name, tensor in pairs:
            tensor = tensor.detach().to("cpu")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and size + nbytes > limit:
                flush()
            chunk[name] = tensor.contiguous()
            size += nbytes
            total += nbytes
        flush()
    except Exception:
        for _ in pairs:  # the rest still gathered, with the other ranks
            pass
        raise
    return parts, total


def read_weight_files(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of every part in ``directory``, part by part (each read when reached)."""
    from safetensors import safe_open

    parts = sorted(Path(directory).glob("part-*.safetensors"))
    if not parts:
        raise FileNotFoundError(f"no weight files (part-*.safetensors) in {directory}")
    for path in parts:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def retie_output_layer(model: torch.nn.Module) -> bool:
    """After an in-place reload of a model whose output layer is tied to its input embedding: the checkpoint has no
    ``lm_head``, so vLLM's reload finds nothing to load there and puts the output layer's old tensors back (on CPU
    also its old prepacked GEMM weights). Tie it to the new embedding again and let its kernel re-prepare. True
    when the model ties them."""
    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if not tied or head is None or embed is None or not hasattr(head, "weight"):
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True
