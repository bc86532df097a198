"""FSDP2 for the student (``train.sharding=fsdp``): each rank keeps 1/N of its weights, gradients and Adam state.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer (the model's
``_no_split_modules`` classes) and then to the model itself, whose own group holds the rest: the
input embeddings, the final norm and the output layer (one parameter when they are tied). A layer's
weights are all-gathered just before its forward and freed after it; its gradients are
reduce-scattered (summed, not averaged: opd's loss is already divided by the step's token count over
all ranks) as soon as its backward is done.

Two things opd does that a plain ``model(...)`` forward does not cover:

- **Scoring reads the decoder and the output layer directly** (``models.scoring.completion_hidden_states``
  and the fused full-vocabulary loss use the output layer's weight outside any forward). FSDP gathers
  the root group only inside the root module's forward, so ``in_root_forward`` runs such code *as*
  the root's forward: the root group is gathered for it and stays gathered until the backward has
  reduce-scattered its gradients (FSDP keeps the root unsharded after forward).
- **Decoding issues a data-dependent number of forwards per rank** (a rank stops when its rows have
  ended; evaluation shares differ), and each sharded forward is a collective. ``gathered`` therefore
  all-gathers the whole model once, lets every rank decode on its own with no collectives, and frees
  the copy afterwards. The loop opens it around a step's sampling and around an evaluation, where all
  ranks enter together; ``HFSampler`` refuses a sharded model that is not gathered.

Checkpoints hold full tensors (``full_tensor``), the same files as an unsharded run, so a sharded run
resumes unsharded and the other way round; ``load_into`` writes each rank's share of a full tensor.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
_INSIDE = "_opd_run_inside_root"  # the keyword that makes the root's forward run a closure instead


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: instances of the model's ``_no_split_modules`` classes (the decoder layers
    of every transformers causal LM)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"train.sharding=fsdp: cannot find the decoder layers of {type(base).__name__} (its _no_split_modules "
            f"names {sorted(names) or 'nothing'}); use train.sharding=none"
        )
    return layers


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int) -> tuple[int, int]:
    """Shard ``model`` in place over the ``world_size`` ranks of the default process group (one mesh dimension);
    ``(elements this rank holds, elements in all)`` of its parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)  # a sum over ranks: the loss is normalised over all of them
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature (``engines.hf.cache_argument`` reads it)
    def root_forward(*args, **kwargs):
        inside = kwargs.pop(_INSIDE, None)
        return inside() if inside is not None else forward(*args, **kwargs)

    model.forward = root_forward
    params = list(model.parameters())
    return sum(local_part(p).numel() for p in params), sum(p.numel() for p in params)


def in_root_forward(model: torch.nn.Module, fn: Callable[[], T]) -> T:
    """``fn()``, run as the forward of a sharded ``model`` (so the root group — embeddings, final norm, output
    layer — is gathered for it and its gradients are reduce-scattered after the backward); ``fn()`` itself for an
    unsharded one."""
    if not is_sharded(model):
        return fn()
    return model(**{_INSIDE: fn})


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """The whole of a sharded ``model`` gathered on every rank (one all-gather per group, entered by all ranks
    together), so forwards inside need no collectives and may differ in number between ranks; freed on exit.
    A no-op for an unsharded model."""
    if not is_sharded(model) or getattr(model, "_opd_gathered", False):
        yield
        return
    modules = fsdp_modules(model)
    model.set_reshard_after_forward(False)
    try:
        for module in modules:
            module.unshard()
        model._opd_gathered = True
        yield
    finally:
        model._opd_gathered = False
        for module in modules:
            module.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root stays gathered between forward and backward


def is_gathered(model: torch.nn.Module) -> bool:
    return not is_sharded(model) or getattr(model, "_opd_gathered", False)


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state dict, in CPU memory on rank 0 (a collective: every rank calls it; the others
    get ``{}``); None for an unsharded model (``save_pretrained`` reads that one itself)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter (embeddings = output layer) under its first name only, as an unsharded save_pretrained writes it
    kept = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in whole.items() if k in kept or k not in dict(model.named_parameters(remove_duplicate=False))}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective: every rank must call it, in the same order); ``t`` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def load_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``param`` — into this rank's shard when ``param`` is sharded (no collective:
    every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            part = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(part.to_local())
        else:
            param.copy_(full)


def like_param(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: sharded the same way when ``param`` is sharded (optimizer state), else as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and full.dim() and tuple(full.shape) == tuple(param.shape):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full
