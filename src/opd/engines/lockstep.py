"""Ranks that share one tensor-parallel engine generate together, however many requests each makes.

With ``sampling.vllm.tensor_parallel_size = T`` the ranks of a launch form groups of ``T`` consecutive
ranks, and each group runs one engine sharded over its ranks. Every rank of a group must then enter
each ``generate`` with the same requests in the same order (vLLM's external launcher: each rank runs the
same scheduler over the same inputs). opd's ranks, though, each sample their own rows, and they may ask
a different number of times: GKD flips a coin per micro-batch, an episode takes as many turns as its
rows need, an evaluation share may be one example longer.

``Lockstep`` makes each request an exchange inside the group: every rank contributes its rows (or
nothing, once it has finished the round), all of them generate the union in rank order, and each keeps
its own rows. A rank that has finished calls ``finish_round``, which goes on serving its peers' requests
until every rank of the group has finished. The loop opens a round around each phase that samples
(``engines.base.sampling_round``: a training step's sampling, an evaluation). Each row carries its own
seed, so a row's sample does not depend on which rows it was generated with.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

Generate = Callable[[list[Any]], list[Any]]  # requests -> one output per request, in order


def group_ranks(world_size: int, group_size: int) -> list[list[int]]:
    """The groups of ``group_size`` consecutive ranks (vLLM's tensor-parallel layout with one pipeline stage)."""
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"{group_size} ranks per group do not divide {world_size} ranks")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def split_outputs(outputs: Sequence[Any], counts: Sequence[int | None], member: int) -> list[Any]:
    """``member``'s outputs from the outputs of the union (``counts``: each member's number of requests in order,
    None for a member that sent none)."""
    start = sum(c or 0 for c in counts[:member])
    return list(outputs[start : start + (counts[member] or 0)])


class Lockstep:
    """One group's exchange over ``exchange`` (all-gather of a Python object across the group's ranks, in rank order)."""

    def __init__(self, exchange: Callable[[Any], list[Any]], member: int):
        self.exchange, self.member = exchange, member

    def _turn(self, mine: list | None, generate: Generate) -> tuple[bool, list[Any]]:
        parts = self.exchange(mine)
        union = [request for part in parts if part for request in part]
        outputs = generate(union) if union else []
        return any(part is not None for part in parts), split_outputs(outputs, [None if p is None else len(p) for p in parts], self.member)

    def request(self, requests: list[Any], generate: Generate) -> list[Any]:
        """Generate ``requests`` (with whatever the group's other ranks ask for at the same time); their outputs."""
        return self._turn(list(requests), generate)[1]

    def finish_round(self, generate: Generate) -> int:
        """Serve the other ranks' requests until every rank of the group has finished; how many turns that took."""
        turns = 0
        while self._turn(None, generate)[0]:
            turns += 1
        return turns


def torch_exchange(group) -> Callable[[Any], list[Any]]:
    """All-gather of a picklable object over ``group`` (a gloo process group, so it runs beside NCCL on GPUs)."""
    import torch.distributed as dist

    size = dist.get_world_size(group)

    def exchange(obj):
        parts = [None] * size
        dist.all_gather_object(parts, obj, group=group)
        return parts

    return exchange
