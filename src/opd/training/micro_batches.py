"""Training micro-batches by a token budget (``train.micro_batch_tokens``; docs/performance.md#token-budget-micro-batches).

A step samples its ``ranks × train.grad_accum`` micro-batches as configured (that is what fixes its sampling
noise); with a budget, their rows are then regrouped for the forward and backward passes: every rank's rows are
gathered, sorted by length, longest first, and cut into micro-batches whose computed tokens stay under the
budget — rows × (longest prompt + longest completion) for the padded layout, whose micro-batches also stop
growing where their padding would pass ``MAX_PADDING``; bins × the longest row when packed (``train.packing``:
``models.scoring.pack_bins``) — a row longer than the budget being a micro-batch of its own. The micro-batches are
dealt to the ranks longest-processing-time first (each to the rank with the fewest tokens so far), which
balances the ranks' tokens; a sharded student's ranks must run as many passes as each other (every pass is a
collective), so the ranks with fewer get empty ones. Every rank computes the same plan from the same rows.

The step's normaliser (``objectives.common.step_normaliser``) is a sum over the step's rows, so the gradient does
not depend on how the rows are grouped; per-row values that need a row's whole group (a group baseline's
advantages) are computed on the batches as sampled, before the rows are regrouped (``Method.row_advantages``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..methods.batch import Batch, Row, batch_rows, row_kind, rows_batch
from ..models.scoring import pack_bins

GROUP_STRIDE = 1 << 20  # group ids of sampled micro-batch m are shifted by m × this, unique over the step
# the padded layout's micro-batches take no row that would make more than this share of their tokens padding (rows
# of very different lengths then train apart: more, smaller passes rather than passes of mostly padding)
MAX_PADDING = 0.1


def pass_tokens(shapes: Sequence[tuple[int, int]], packed: bool) -> int:
    """The tokens one forward computes for rows of ``(prompt, completion)`` lengths: packed, bins × the longest row
    (``models.scoring.pack_bins``); else the padded ``rows × (longest prompt + longest completion)`` (prompts are
    left-padded, completions right-padded)."""
    if not shapes:
        return 0
    if packed:
        lengths = [p + c for p, c in shapes]
        return len(pack_bins(lengths)) * max(lengths)
    return len(shapes) * (max(p for p, _ in shapes) + max(c for _, c in shapes))


def plan_micro_batches(shapes: Sequence[tuple[int, int]], budget: int, packed: bool) -> list[list[int]]:
    """Row indices of each micro-batch: the rows sorted by length (longest first, ties by index), each added to the
    current micro-batch while its ``pass_tokens`` stay within ``budget`` (and, padded, its padding within
    ``MAX_PADDING``); a row alone over the budget is a micro-batch alone."""
    order = sorted(range(len(shapes)), key=lambda i: (-(shapes[i][0] + shapes[i][1]), i))
    plan: list[list[int]] = []
    for i in order:
        if plan and fits([shapes[j] for j in plan[-1]] + [shapes[i]], budget, packed):
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def fits(shapes: Sequence[tuple[int, int]], budget: int, packed: bool) -> bool:
    computed = pass_tokens(shapes, packed)
    return computed <= budget and (packed or 1 - sum(p + c for p, c in shapes) / computed <= MAX_PADDING)


def deal_to_ranks(costs: Sequence[int], world: int) -> list[list[int]]:
    """Micro-batch indices per rank, longest-processing-time first: each micro-batch (most tokens first) goes to
    the rank with the fewest tokens so far (ties: the lower rank), each rank's list in the order dealt."""
    load, dealt = [0] * world, [[] for _ in range(world)]
    for m in sorted(range(len(costs)), key=lambda m: (-costs[m], m)):
        rank = min(range(world), key=lambda r: (load[r], r))
        dealt[rank].append(m)
        load[rank] += costs[m]
    return dealt


def step_plan(rows: Sequence[Row], budget: int, packed: bool, world: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(micro, dealt)``: the step's micro-batches as row indices into ``rows`` (the whole step's, in rank order) —
    the same whatever the number of ranks — and each rank's micro-batches as indices into ``micro``. Rows of
    different kinds (on-/off-policy, with/without sampler log-probs) never share a micro-batch."""
    micro: list[list[int]] = []
    for kind in sorted({row_kind(row) for row in rows}):
        members = [i for i, row in enumerate(rows) if row_kind(row) == kind]
        shapes = [(len(rows[i].prompt_ids), len(rows[i].completion_ids)) for i in members]
        micro += [[members[j] for j in part] for part in plan_micro_batches(shapes, budget, packed)]
    costs = [pass_tokens([(len(rows[i].prompt_ids), len(rows[i].completion_ids)) for i in m], packed) for m in micro]
    return micro, deal_to_ranks(costs, world)


def regroup(s, sampled: list[Batch], first_micro: int) -> list[tuple[int, Batch]]:
    """This rank's training micro-batches of a step, ``(index in the step's plan, batch)`` — an index that does not
    depend on the number of ranks (it seeds the pass's dropout) — from its ``sampled`` micro-batches (the first of
    which is the step's micro-batch ``first_micro``); padding passes (index -1) added for a sharded student so
    that every rank runs as many passes."""
    from ..parallel.sharding import is_sharded

    ranks, t = s.ranks, s.cfg.train
    own = [row for j, batch in enumerate(sampled) for row in batch_rows(batch, (first_micro + j) * GROUP_STRIDE)]
    rows = ranks.gather(lambda: own) if ranks.several else own  # every rank's rows, in rank order
    micro, dealt = step_plan(rows, t.micro_batch_tokens, t.packing, ranks.world_size)
    pad_id = s.tokenizer.pad_token_id
    batches = [(m, rows_batch([rows[i] for i in micro[m]], pad_id, s.device)) for m in dealt[ranks.rank]]
    if is_sharded(s.student):
        empty = padding_row(min(rows, key=lambda row: row.tokens))
        batches += [(-1, padding_pass(empty, pad_id, s.device)) for _ in range(max(map(len, dealt)) - len(batches))]
    return batches


def padding_row(row: Row) -> Row:
    """What an empty pass runs: ``row`` cut to its last prompt token and first completion token, nothing trained
    (a zero advantage), so the pass costs two tokens of every model that scores it."""
    logps = row.sampler_logps[:1] if row.sampler_logps is not None else None
    return replace(
        row, prompt_ids=row.prompt_ids[-1:], completion_ids=row.completion_ids[:1], trained=[0] * len(row.completion_ids[:1]),
        sampler_logps=logps, advantage=0.0 if row.advantage is not None else None,
    )


def padding_pass(row: Row, pad_id: int, device) -> Batch:
    batch = rows_batch([row], pad_id, device)
    batch.padding_pass = True
    return batch
