"""One run across several processes: the ranks a launcher started, and what they exchange.

``torchrun --nproc_per_node N -m opd train …`` and ``accelerate launch --num_processes N -m opd train …``
both start N copies of opd with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address) in
their environment. ``start_ranks`` joins them into one process group (gloo on CPU, nccl on CUDA); without
those variables, or with ``WORLD_SIZE=1``, opd runs in one process and every exchange here is the identity.

Data parallelism as opd does it: every rank holds the whole student and its teachers; the step's prompts
are split into ``world_size × train.grad_accum`` micro-batches, rank ``r`` taking micro-batches
``r·grad_accum … (r+1)·grad_accum − 1``; each micro-batch's loss is divided by the step's normaliser summed
over all ranks (``Ranks.sum``); after the backward passes the gradients are summed over ranks
(``Ranks.sum_gradients``, bucketed all-reduces, once per optimizer update rather than once per micro-batch),
so every rank takes the same optimizer step that one process with all the micro-batches would take.
Rank 0 alone writes (metrics, TensorBoard, checkpoints, ``final/``: ``Ranks.from_main``); held-out
evaluation is split over the ranks and gathered (``Ranks.gather``).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, TypeVar

import torch

from .launchers import ignored_launch_settings, launched_world

log = logging.getLogger(__name__)

T = TypeVar("T")
BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MiB in float32)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run, and the collectives the loop needs (all identities with one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (nccl needs CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def sum(self, value: float) -> float:
        """``value`` summed over ranks (float64 on the wire, so token counts stay exact)."""
        if not self.several:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def max(self, value: int) -> int:
        if not self.several:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        if not self.several:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's ``.grad`` by its sum over ranks. A parameter no rank has a gradient for keeps
        none (so AdamW skips it, as in one process); one that only some ranks have counts as zeros on the others.

        Parameters are visited in the same order on every rank and packed into buckets of up to
        ``BUCKET_ELEMENTS`` elements of one dtype and device, one all-reduce per bucket."""
        if not self.several:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(has_grad, op=torch.distributed.ReduceOp.MAX)
        grads = []
        for p, anywhere in zip(params, has_grad.tolist()):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in gradient_buckets(grads, BUCKET_ELEMENTS):
            if len(bucket) == 1:
                torch.distributed.all_reduce(bucket[0])
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def merge_metrics(self, sums: dict[str, float], counts: dict[str, int], summed: Iterable[str]) -> dict[str, float]:
        """The step's metrics from every rank's per-key sums over its micro-batches and how many micro-batches
        reported each key: the keys in ``summed`` added, every other one the mean over all the micro-batches that
        report it — the same numbers one process with all the micro-batches gives."""
        parts = [(sums, counts)]
        if self.several:
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, (sums, counts))
        return merge_rank_metrics(parts, summed)

    def gather_rows(self, tensor_RW: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's ``[R, W]`` tensor stacked in rank order (widths right-padded with zeros to the widest; ranks
        may hold different numbers of rows), and the row at which this rank's rows start."""
        if not self.several:
            return tensor_RW, 0
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        counts[self.rank] = tensor_RW.shape[0]
        torch.distributed.all_reduce(counts)
        rows, width = int(counts.max()), self.max(tensor_RW.shape[1])
        padded = torch.nn.functional.pad(tensor_RW, (0, width - tensor_RW.shape[1], 0, rows - tensor_RW.shape[0]))
        padded = padded.contiguous().to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        counts = counts.tolist()
        whole = torch.cat([part[:n] for part, n in zip(parts, counts)])
        return whole.to(tensor_RW.device), sum(counts[: self.rank])

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result; an exception on rank 0 is raised on all."""
        if not self.several:
            return fn()
        box: list = [None]
        failure: BaseException | None = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # every rank must leave this broadcast, then all raise
                failure = err
                box[0] = ("error", err if picklable(err) else RuntimeError(f"rank 0: {type(err).__name__}: {err}"))
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "error":
            value.reported_by_rank0 = True  # rank 0 prints it; the CLI keeps the other ranks quiet
            raise value
        return value

    def gather(self, fn: Callable[[], list]) -> list:
        """Run ``fn`` on every rank and give every rank all their lists, concatenated in rank order; an
        exception on any rank is raised on all (the lowest rank's; rank 0 prints it, the others stay quiet)."""
        if not self.several:
            return fn()
        own: Exception | None = None
        try:
            mine = ("ok", fn())
        except Exception as err:
            own = err
            mine = ("error", self._portable(err))
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine)
        self._raise_first([value if kind == "error" else None for kind, value in gathered], own)
        return [item for _, part in gathered for item in part]

    def raise_together(self, error: Exception | None) -> None:
        """Raise on every rank the error of the lowest rank that has one (rank 0 prints it, the others stay quiet),
        or return on every rank when none has: what lets every rank leave a phase the same way after one of them
        failed in it. One integer all-reduce when no rank failed; every rank calls it."""
        if not self.several:
            if error is not None:
                raise error
            return
        if not self.max(int(error is not None)):
            return
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, self._portable(error) if error is not None else None)
        self._raise_first(gathered, error)

    def _portable(self, err: Exception) -> Exception:
        return err if picklable(err) else RuntimeError(f"rank {self.rank}: {type(err).__name__}: {err}")

    def _raise_first(self, errors: list, own: Exception | None) -> None:
        for rank, error in enumerate(errors):
            if error is not None:
                error = own if rank == self.rank else error
                error.raised_together = True  # every rank raises it here: the loop ends them all in step
                if not self.main:
                    error.reported_by_rank0 = True
                raise error

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Every rank starts from rank 0's trainable weights (identical seeds make them equal already; this makes
        it certain, as DDP does)."""
        if not self.several:
            return
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.several:
            torch.distributed.barrier()


def picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def gradient_buckets(grads: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients grouped into buckets of one dtype and device, each under ``limit`` elements
    (a larger tensor is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        if buckets and (buckets[-1][0].dtype, buckets[-1][0].device) == (g.dtype, g.device) and size + g.numel() <= limit:
            buckets[-1].append(g)
            size += g.numel()
        else:
            buckets.append([g])
            size = g.numel()
    return buckets


def merge_rank_metrics(per_rank: list[tuple[dict[str, float], dict[str, int]]], summed: Iterable[str]) -> dict[str, float]:
    """One metrics dict from every rank's ``(sums, counts)``: keys in ``summed`` added, the others the sum over all
    ranks divided by the number of micro-batches that reported them."""
    summed = set(summed)
    merged = {}
    for key in dict.fromkeys(k for sums, _ in per_rank for k in sums):
        total = sum(sums[key] for sums, _ in per_rank if key in sums)
        merged[key] = total if key in summed else total / sum(counts[key] for sums, counts in per_rank if key in sums)
    return merged


SINGLE = Ranks()


def thread_oversubscription(ranks: Ranks, threads: int | None) -> str | None:
    """A warning when the ranks on this machine would run more CPU threads than it has cores (None otherwise)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size) or 1)
    cores = os.cpu_count() or 1
    if not ranks.several or ranks.device.type != "cpu" or not threads or threads * local_ranks <= cores:
        return None
    return (
        f"train.threads={threads} on each of {local_ranks} ranks is {threads * local_ranks} threads on {cores} cores; "
        f"train.threads={max(1, cores // local_ranks)} avoids oversubscribing them"
    )


def start_ranks(device_name: str, timeout_s: float) -> Ranks:
    """Join the launcher's process group (once per process) and return this process's ``Ranks``; ``SINGLE``
    when opd was not launched across several processes."""
    rank, world, local = launched_world()
    if rank == 0:
        for setting in ignored_launch_settings():
            log.warning("ignoring %s", setting)
    if world <= 1:
        return SINGLE
    dist = torch.distributed
    cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"the process group ({dist.get_rank()}/{dist.get_world_size()}) disagrees with RANK/WORLD_SIZE ({rank}/{world})")
    if rank != 0:  # rank 0 says it once; the others only speak up for errors
        logging.getLogger("opd").setLevel(logging.ERROR)
    log.info("rank %d of %d (local rank %d) on %s", rank, world, local, device)
    return Ranks(rank, world, local, device)


def stop_ranks(ranks: Ranks, finished: bool) -> None:
    """Leave the process group ``start_ranks`` joined (nothing to do with one process). A finished run first
    waits for every rank (gloo aborts a process whose peer has already torn its connections down); a failed
    one leaves at once, since the others may never arrive."""
    if ranks.several and torch.distributed.is_initialized():
        if finished:
            ranks.barrier()
        torch.distributed.destroy_process_group()
