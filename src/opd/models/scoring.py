"""Forward passes over rollouts: completion hidden states and per-token log-probs.

Logits are formed from hidden states one chunk of tokens at a time. With gradients on, each
chunk is recomputed in the backward pass (activation checkpointing), so the live logits are
``[chunk, V]`` rather than ``[B, C, V]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..objectives.fused import OutputHead, output_head
from ..parallel.sharding import in_root_forward
from .rollouts import Rollouts

Projection = Callable[[torch.Tensor], torch.Tensor]  # hidden_NH -> logits_NV


def completion_hidden_states(model: torch.nn.Module, rollouts: Rollouts, packed: bool = False) -> torch.Tensor:
    """Final-layer hidden states ``[B, C, H]`` at the positions that predict each completion token. ``packed``: the
    rows' real tokens packed into bins with per-row position ids and no attention mask (``packed_layout``; zeros
    where a row has no token); otherwise as the padded ``[B, L]`` batch."""
    ids_BL, mask_BL = rollouts.input_ids_BL(), rollouts.attention_mask_BL()
    position_ids_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    window = slice(rollouts.prompt_length - 1, rollouts.prompt_length - 1 + rollouts.completion_ids_BC.shape[1])
    if not packed:  # a sharded model's root group (embeddings, norm, output layer) gathered for it
        hidden_BLH = in_root_forward(
            model, lambda: decoder(input_ids=ids_BL, attention_mask=mask_BL, position_ids=position_ids_BL, use_cache=False).last_hidden_state
        )
        return hidden_BLH[:, window]
    valid_BL = mask_BL.bool()
    ids_KN, position_ids_KN, slot_BL = packed_layout(ids_BL, valid_BL, position_ids_BL)
    hidden_KNH = in_root_forward(model, lambda: packed_forward(decoder, ids_KN, position_ids_KN))
    hidden_MH = hidden_KNH.flatten(0, 1)
    return torch.where(valid_BL[:, window, None], hidden_MH[slot_BL[:, window]], 0)


def pack_bins(lengths: list[int]) -> list[list[int]]:
    """Rows into bins as long as the longest row, first-fit decreasing (longest first, ties by index): each bin's
    row indices in the order they sit in it. No row is split; short rows fill the space beside long ones."""
    capacity, bins, room = max(lengths, default=0), [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, free in enumerate(room) if lengths[i] <= free), None)
        if k is None:
            bins.append([]), room.append(capacity)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def packed_layout(ids_BL: torch.Tensor, valid_BL: torch.Tensor, position_ids_BL: torch.Tensor):
    """``(ids_KN, position_ids_KN, slot_BL)``: the rows' real tokens in ``K`` bins of the longest row's length
    (``pack_bins``), each row's positions counting from 0, and where each ``[B, L]`` position's token went (its
    index in the flattened ``[K·N]``; meaningless where ``valid_BL`` is false). A bin's unused tail (id 0) comes
    after its rows and takes its slots' positions in the bin: causal attention keeps every real token from it."""
    lengths = valid_BL.sum(-1).tolist()
    bins, capacity = pack_bins(lengths), max(lengths)
    start_B = torch.zeros(len(lengths), dtype=torch.long)
    for k, rows in enumerate(bins):
        offset = k * capacity
        for i in rows:
            start_B[i] = offset
            offset += lengths[i]
    slot_BL = start_B.to(ids_BL.device)[:, None] + position_ids_BL
    ids_M = torch.zeros(len(bins) * capacity, dtype=ids_BL.dtype, device=ids_BL.device)
    position_ids_M = torch.arange(capacity, device=ids_BL.device).repeat(len(bins))
    ids_M[slot_BL[valid_BL]] = ids_BL[valid_BL]
    position_ids_M[slot_BL[valid_BL]] = position_ids_BL[valid_BL]
    return ids_M.view(len(bins), capacity), position_ids_M.view(len(bins), capacity), slot_BL


def packed_forward(decoder: torch.nn.Module, ids_KN: torch.Tensor, position_ids_KN: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[K, N, H]`` of the decoder over bins of rows (``packed_layout``) with no attention mask:
    transformers reads each restart of the position ids as a row boundary (the implementations in
    ``models.attention.PACKING_IMPLEMENTATIONS``), so no token attends across rows. A bin is as long as the
    micro-batch's longest row, so an implementation that builds a dense mask (sdpa, eager, flex) spends at most
    ``K·N²`` on attention, not the square of all the tokens. The flash-attention kernels read boundaries from
    the position ids of a batch of one sequence only (and compute each row's own block), so for them the bins
    run as one ``[1, K·N]`` sequence."""
    K, N = ids_KN.shape
    if getattr(decoder.config, "_attn_implementation", "").startswith("flash_attention"):
        out = decoder(input_ids=ids_KN.reshape(1, K * N), position_ids=position_ids_KN.reshape(1, K * N), attention_mask=None, use_cache=False)
        return out.last_hidden_state.view(K, N, -1)
    return decoder(input_ids=ids_KN, position_ids=position_ids_KN, attention_mask=None, use_cache=False).last_hidden_state


def projection(model: torch.nn.Module) -> Projection:
    """hidden → float32 logits through the model's output layer (with logit soft-capping if the model uses it)."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def project(hidden_NH: torch.Tensor) -> torch.Tensor:
        logits_NV = head(hidden_NH.to(head.weight.dtype)).float()
        if softcap:
            logits_NV = torch.tanh(logits_NV / softcap) * softcap
        return logits_NV

    return project


def loss_head(model: torch.nn.Module) -> OutputHead | Projection:
    """The output layer for the fused full-vocabulary loss, or a projection when it is not a plain linear layer."""
    return output_head(model) or projection(model)


def _chunk_logprobs(hidden_NH, ids_N, project: Projection, temperature: float):
    logp_NV = (project(hidden_NH) / temperature).log_softmax(-1)
    return logp_NV.gather(-1, ids_N[:, None]).squeeze(-1)


@torch.no_grad()
def _chunk_entropy(hidden_NH, project: Projection, temperature: float):
    logp_NV = (project(hidden_NH) / temperature).log_softmax(-1)
    return -(logp_NV.exp() * logp_NV.clamp(min=torch.finfo(logp_NV.dtype).min)).sum(-1)


def token_logprobs(
    hidden_NH: torch.Tensor,
    ids_N: torch.Tensor,
    project: Projection,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp_N, entropy_N)``: log π(id) at each position, chunk by chunk, and (only when asked, without
    gradient) the full-vocabulary entropy; ``entropy_N`` is None otherwise."""
    logps, entropies = [], []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        h, ids = hidden_NH[start : start + chunk_size], ids_N[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            logps.append(checkpoint(_chunk_logprobs, h, ids, project, temperature, use_reentrant=False))
        else:
            logps.append(_chunk_logprobs(h, ids, project, temperature))
        if with_entropy:
            entropies.append(_chunk_entropy(h, project, temperature))
    empty = hidden_NH.new_zeros(0, dtype=torch.float32)
    logp_N = torch.cat(logps) if logps else empty
    if not with_entropy:
        return logp_N, None
    return logp_N, torch.cat(entropies) if entropies else empty


def rollout_logprobs(
    model: torch.nn.Module, rollouts: Rollouts, temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp_BC, entropy_BC)`` of the completion tokens under ``model``, zero where there is no token;
    ``entropy_BC`` (no gradient) only with ``with_entropy``, else None; ``packed`` as in ``completion_hidden_states``."""
    hidden_BCH = completion_hidden_states(model, rollouts, packed)
    mask_BC = rollouts.completion_mask_BC.bool()
    logp_N, entropy_N = token_logprobs(
        hidden_BCH[mask_BC], rollouts.completion_ids_BC[mask_BC], projection(model), temperature, chunk_size, with_entropy
    )
    logp_BC = torch.zeros(mask_BC.shape, dtype=torch.float32, device=mask_BC.device).masked_scatter(mask_BC, logp_N)
    if entropy_N is None:
        return logp_BC, None
    return logp_BC, torch.zeros_like(logp_BC).masked_scatter(mask_BC, entropy_N)
