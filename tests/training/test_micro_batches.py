"""Token-budget micro-batches (train.micro_batch_tokens): the plan keeps every micro-batch under the budget and
balances the ranks, and regrouping a step's rows leaves its gradient as the fixed-row grouping's."""

import copy
import random

import pytest
import torch
from conftest import make_config

from opd.training.assembly import build_session
from opd.training.loop import SUMMED_METRICS, accumulate_gradients, training_micro_batches
from opd.training.micro_batches import MAX_PADDING, deal_to_ranks, pass_tokens, plan_micro_batches

WORLD = ["sampling.samples_per_prompt=2", "sampling.max_new_tokens=40"]


def test_pass_tokens_count_the_padding_or_the_packed_bins():
    assert pass_tokens([(5, 10), (2, 3)], packed=False) == 2 * (5 + 10)
    assert pass_tokens([(5, 10), (2, 3)], packed=True) == 2 * 15  # the longest row fills its bin; the other has one alone
    assert pass_tokens([(5, 10), (5, 5), (2, 3)], packed=True) == 2 * 15  # bins of the longest row: [15], [10 + 5]
    assert pass_tokens([(5, 10), (5, 6), (2, 3)], packed=True) == 3 * 15  # 11 and 5 do not share a 15-token bin


def test_padded_micro_batches_keep_their_padding_under_the_cap():
    shapes = [(10, 100), (10, 95), (10, 40), (10, 38)]
    plan = plan_micro_batches(shapes, 10_000, packed=False)
    assert plan == [[0, 1], [2, 3]]  # the 40-token rows would make the first micro-batch 36% padding
    for m in plan:
        real = sum(sum(shapes[i]) for i in m)
        assert 1 - real / pass_tokens([shapes[i] for i in m], False) <= MAX_PADDING


@pytest.mark.parametrize("packed", [False, True])
def test_the_plan_covers_every_row_once_within_the_budget(packed):
    rng = random.Random(0)
    shapes = [(rng.randint(5, 60), rng.choice([rng.randint(1, 40), rng.randint(200, 900)])) for _ in range(40)]
    plan = plan_micro_batches(shapes, 1000, packed)
    assert sorted(i for m in plan for i in m) == list(range(40))
    for m in plan:
        assert len(m) == 1 or pass_tokens([shapes[i] for i in m], packed) <= 1000
    assert len(plan) < 40  # short rows share


def test_a_row_longer_than_the_budget_is_a_micro_batch_of_its_own():
    assert plan_micro_batches([(10, 10), (50, 500), (10, 12)], 100, packed=False) == [[1], [2, 0]]
    assert plan_micro_batches([(10, 10), (50, 500), (10, 12)], 100, packed=True) == [[1], [2, 0]]


def test_dealing_balances_the_ranks_tokens():
    costs = [900, 100, 800, 300, 300, 200, 100, 100]
    dealt = deal_to_ranks(costs, 2)
    assert sorted(m for d in dealt for m in d) == list(range(8))
    loads = [sum(costs[m] for m in d) for d in dealt]
    assert max(loads) - min(loads) <= 100  # 1400 and 1400 here
    assert dealt == [[0, 4, 1, 6], [2, 3, 5, 7]]  # most tokens first, each to the lighter rank (ties: the lower)


def sampled_step(s, micro: int = 2, prompts: int = 4):
    """A step's sampled micro-batches as the loop makes them (advantages over the groups as sampled)."""
    examples = s.task.sample_train(prompts, random.Random(0))
    per = prompts // micro
    batches = []
    for j in range(micro):
        batch = s.method.data(s, examples[j * per : (j + 1) * per], random.Random(j), torch.Generator().manual_seed(j))
        batch.advantages_B = s.method.row_advantages(batch)
        batches.append(batch)
    return batches


def gradients(s, batches):
    s.student.zero_grad(set_to_none=True)
    sums, counts, finite = accumulate_gradients(s, batches, 0)
    assert finite
    return {n: p.grad.clone() for n, p in s.student.named_parameters() if p.grad is not None}, s.ranks.merge_metrics(sums, counts, SUMMED_METRICS)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=opd"],
        ["method.name=gkd", "method.gkd.lambda_onpolicy=1.0"],
        ["method.name=grpo"],
        ["method.name=reopold", "method.reopold.switch_step=0"],
        ["method.name=opd_plus"],  # the constant normaliser counts rows
    ],
    ids=["opd", "gkd", "grpo", "reopold", "opd_plus"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_regrouped_micro_batches_give_the_fixed_row_gradient(tmp_path, tiny_models, overrides, packed):
    s = build_session(make_config(tmp_path, tiny_models, *WORLD, *overrides, "train.micro_batch_tokens=150", f"train.packing={packed}"))
    sampled = sampled_step(s)
    if s.cfg.method.name == "grpo":
        for batch in sampled:  # every group a spread of rewards, so that the group advantages are not all zero
            batch.rewards = [float(i % 2) for i in range(len(batch.rewards))]
            batch.advantages_B = s.method.row_advantages(batch)
    regrouped = training_micro_batches(s, copy.deepcopy(sampled), 0, 0)
    fixed, fixed_metrics = gradients(s, copy.deepcopy(sampled))
    ours, metrics = gradients(s, regrouped)
    rows = [b.rollouts.batch_size for b in regrouped]
    assert sum(rows) == 8 and len(regrouped) > 2, "the budget splits the step's 8 rows otherwise than 2 x 4"
    assert fixed.keys() == ours.keys() and len(fixed) > 0
    for name in fixed:
        torch.testing.assert_close(ours[name], fixed[name], rtol=2e-5, atol=1e-7, msg=name)
    assert metrics["loss"] == pytest.approx(fixed_metrics["loss"], rel=1e-5, abs=1e-8)


def test_regrouping_cuts_the_padding(tmp_path, tiny_models):
    """Sorted by length, the regrouped micro-batches compute fewer padding tokens than the sampled ones."""
    s = build_session(make_config(tmp_path, tiny_models, *WORLD, "train.micro_batch_tokens=150"))
    sampled = sampled_step(s, micro=1, prompts=8)
    regrouped = training_micro_batches(s, copy.deepcopy(sampled), 0, 0)

    def padding(batches):
        real = sum(int(b.rollouts.attention_mask_BL().sum()) for b in batches)
        return 1 - real / sum(b.rollouts.input_ids_BL().numel() for b in batches)

    assert padding(regrouped) < padding(sampled)
