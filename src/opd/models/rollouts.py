"""Rollouts: a batch of prompts and completions as the loop, the teachers and the objectives read it.

A ``Rollouts`` batch holds left-padded prompts and right-padded completions, so every
row's completion starts at the same column ``P`` of ``input_ids_BL``. That alignment lets
the student, the teacher and every objective work on ``[B, C]`` completion tensors.

``build_rollouts`` is how every engine, the episode driver and the given-completion sources (reference
solutions, teacher demonstrations) make them from token lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch


@dataclass
class Rollouts:
    prompt_ids_BP: torch.Tensor  # left-padded
    prompt_mask_BP: torch.Tensor  # 1 on real prompt tokens
    completion_ids_BC: torch.Tensor  # right-padded with the pad id
    completion_mask_BC: torch.Tensor  # 1 on completion tokens that exist (EOS included)
    loss_mask_BC: torch.Tensor  # 1 on tokens the student generated and is trained on
    sampler_logp_BC: torch.Tensor | None = None  # log-prob of each token under the sampling distribution
    texts: list[str] = field(default_factory=list)  # decoded completions, special tokens stripped
    group_B: list[int] = field(default_factory=list)  # index of each row's example in the batch
    route_B: list[str | None] = field(default_factory=list)  # teacher route of each row (multi-teacher), if any

    @property
    def batch_size(self) -> int:
        return self.completion_ids_BC.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids_BP.shape[1]

    @property
    def completion_lengths_B(self) -> torch.Tensor:
        return self.completion_mask_BC.sum(-1)

    def input_ids_BL(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BC], dim=1)

    def attention_mask_BL(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_BP, self.completion_mask_BC], dim=1)

    def with_prompts(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> "Rollouts":
        """The same completions behind other prompts (e.g. a teacher's privileged prompt)."""
        return replace(self, prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP)

    def select(self, rows: Sequence[int]) -> "Rollouts":
        """The given rows, in that order (texts, groups and routes follow)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.completion_ids_BC.device)
        pick = lambda values: [values[i] for i in rows] if values else []  # noqa: E731
        return replace(
            self._map_tensors(lambda t: t.index_select(0, index)),
            texts=pick(self.texts),
            group_B=pick(self.group_B),
            route_B=pick(self.route_B),
        )

    def to(self, device: torch.device | str) -> "Rollouts":
        return self._map_tensors(lambda t: t.to(device))

    def _map_tensors(self, fn) -> "Rollouts":
        return replace(self, **{name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in TENSOR_FIELDS})


TENSOR_FIELDS = ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BC", "completion_mask_BC", "loss_mask_BC", "sampler_logp_BC")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids_BP, mask_BP)``, padding on the left."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids_BC, mask_BC)``, padding on the right."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def build_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    *,
    trained: Sequence[Sequence[int]] | None = None,
    logps: Sequence[Sequence[float] | torch.Tensor] | None = None,
    texts: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> Rollouts:
    """The one way ``Rollouts`` are made from token lists (every engine, the episode driver, given completions):
    prompts left-padded, completions right-padded with ``pad_id``; ``trained`` 1 on the tokens the loss trains on
    (default: every completion token); ``logps`` the sampler's log-prob of each token (default: none, for
    completions nobody sampled); ``texts`` the decoded completions; every row its own group."""
    prompt_ids_BP, prompt_mask_BP = left_pad(prompts, pad_id)
    completion_ids_BC, completion_mask_BC = right_pad(completions, pad_id)
    loss_mask_BC = right_pad(trained, 0)[0] if trained is not None else completion_mask_BC.clone()
    sampler_logp_BC = None
    if logps is not None:
        sampler_logp_BC = torch.zeros(completion_ids_BC.shape, dtype=torch.float32)
        for row, values in enumerate(logps):
            if len(values):
                sampler_logp_BC[row, : len(values)] = torch.as_tensor(values, dtype=torch.float32)
    rollouts = Rollouts(
        prompt_ids_BP, prompt_mask_BP, completion_ids_BC, completion_mask_BC, loss_mask_BC, sampler_logp_BC,
        list(texts or []), list(range(len(completions))),
    )
    return rollouts if device is None else rollouts.to(device)


def stack_rows(picks: Sequence[tuple[Rollouts, int]], pad_id: int) -> Rollouts:
    """One batch of the given rows of several batches (``(rollouts, row)`` in order): prompts re-padded on the left,
    completions and their masks and log-probs on the right; texts and routes follow, groups are renumbered 0..n-1."""
    prompts, completions, masks, logps, texts = [], [], [], [], []
    for r, i in picks:
        prompts.append(r.prompt_ids_BP[i][r.prompt_mask_BP[i].bool()].tolist())
        n = int(r.completion_mask_BC[i].sum())
        completions.append(r.completion_ids_BC[i, :n].tolist())
        masks.append(r.loss_mask_BC[i, :n].tolist())
        logps.append(r.sampler_logp_BC[i, :n].cpu() if r.sampler_logp_BC is not None else torch.zeros(n))
        texts.append(r.texts[i] if r.texts else "")
    return build_rollouts(prompts, completions, pad_id, trained=masks, logps=logps, texts=texts)
