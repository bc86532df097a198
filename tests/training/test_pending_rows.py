"""The rows of the steps ahead (``sampling.max_staleness``) go into a checkpoint without pickle and come back equal:
tensors bit for bit, examples, rewards, metrics and notes as they were; a value a checkpoint cannot hold is refused,
naming it. (The schedule itself, a kill mid-step and the exact resume run against a real vLLM server in
tests/engines/test_vllm_server.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from opd.methods.batch import Batch
from opd.models.rollouts import build_rollouts
from opd.tasks.base import Example
from opd.training.pending_rows import RowsNotSaved, StepRows, load_pending, save_pending


def batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, 3], [4, 5]]
    completions = [[7, 8, 9, 2], [6]]
    logps = [torch.randn(len(c), generator=g).tolist() for c in completions]
    rollouts = build_rollouts(prompts, completions, 0, logps=logps, texts=["abc", "d"])
    rollouts.group_B, rollouts.route_B = [0, 0], ["numbers", None]
    examples = [
        Example("1+2?", "3", meta={"family": "numbers", "tests": [{"in": [1, 2], "out": 3}], "score": float("nan")}),
        Example("hi", None, solution="hello", messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})),
    ]
    b = Batch(rollouts, examples, on_policy=True, rewards=[1.0, -math.inf], info={"reward": 0.5}, row_notes=["accepted", "replaced"])
    b.advantages_B, b.seed = torch.randn(2, generator=g), 12345
    return b


def test_rows_ahead_come_back_from_a_checkpoint_as_they_were(tmp_path):
    per_rank = [{3: StepRows([batch(0), batch(1)], version=1), 4: StepRows([batch(2)], version=2)}, {3: StepRows([batch(3)], version=1)}]
    save_pending(tmp_path, per_rank)
    for rank in (0, 1):
        back = load_pending(tmp_path, rank, 2, torch.device("cpu"))
        assert back.keys() == per_rank[rank].keys()
        for step, rows in per_rank[rank].items():
            assert back[step].version == rows.version
            for a, b in zip(rows.batches, back[step].batches):
                for key, value in vars(a.rollouts).items():
                    other = getattr(b.rollouts, key)
                    assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
                assert torch.equal(a.advantages_B, b.advantages_B) and a.seed == b.seed and a.on_policy == b.on_policy
                assert a.rewards[0] == b.rewards[0] and b.rewards[1] == -math.inf and a.info == b.info and a.row_notes == b.row_notes
                assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
                assert b.examples[1].messages == a.examples[1].messages and b.examples[1].solution == "hello"
                assert b.examples[0].meta["tests"] == a.examples[0].meta["tests"] and math.isnan(b.examples[0].meta["score"])


def test_rows_sampled_by_another_number_of_ranks_are_not_taken(tmp_path):
    save_pending(tmp_path, [{1: StepRows([batch(0)], 0)}])
    assert load_pending(tmp_path, 0, 2, torch.device("cpu")) is None
    assert load_pending(tmp_path / "none", 0, 1, torch.device("cpu")) is None


def test_a_value_a_checkpoint_cannot_hold_is_refused_by_name(tmp_path):
    b = batch(0)
    b.examples[0].meta["environment"] = object()
    with pytest.raises(RowsNotSaved, match="example.meta.environment is a object"):
        save_pending(tmp_path, [{1: StepRows([b], 0)}])
