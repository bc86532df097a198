"""Padding-free packing (train.packing): a micro-batch's rows run as one sequence with per-row position ids, and
every completion token gets the log-prob (and gradient) the padded batch gives it."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen3Config

from opd.models.attention import packing_problem
from opd.models.rollouts import build_rollouts
from opd.models.scoring import completion_hidden_states, pack_bins, packed_layout, rollout_logprobs

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny(config_class, implementation: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**SMALL, attn_implementation=implementation), dtype=torch.float32).eval()


def ragged_rollouts():
    """Prompts of 1-9 tokens and completions of 0-13, so padding sits on both sides of every row but the longest."""
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 13), (9, 2), (1, 7), (5, 0), (2, 11)]
    prompts = [torch.randint(1, 61, (p,), generator=g).tolist() for p, _ in lengths]
    completions = [torch.randint(1, 61, (c,), generator=g).tolist() for _, c in lengths]
    return build_rollouts(prompts, completions, pad_id=0)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen3Config, MistralConfig], ids=["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_logprobs_equal_the_padded_batch(config_class, implementation):
    model, r = tiny(config_class, implementation), ragged_rollouts()
    padded_BC, _ = rollout_logprobs(model, r)
    packed_BC, _ = rollout_logprobs(model, r, packed=True)
    mask = r.completion_mask_BC.bool()
    assert mask.sum() == 33
    assert torch.allclose(packed_BC[mask], padded_BC[mask], atol=1e-5, rtol=0)
    assert (packed_BC[~mask] == 0).all()


def test_packed_rows_do_not_see_each_other():
    """Changing one row's tokens changes no other row's log-probs: the restarts of the position ids are boundaries."""
    model, r = tiny(Qwen3Config, "sdpa"), ragged_rollouts()
    before, _ = rollout_logprobs(model, r, packed=True)
    r.prompt_ids_BP[0, -1] = (r.prompt_ids_BP[0, -1] % 60) + 1
    after, _ = rollout_logprobs(model, r, packed=True)
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before[1:], after[1:])


def test_packed_gradients_equal_the_padded_batch():
    model, r = tiny(LlamaConfig, "sdpa"), ragged_rollouts()
    grads = []
    for packed in (False, True):
        model.zero_grad()
        hidden_BCH = completion_hidden_states(model, r, packed)
        (hidden_BCH * r.completion_mask_BC[..., None]).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[0].norm()  # float32 summation order differs


def test_packing_is_refused_where_rows_would_mix():
    qwen = Qwen3Config(**SMALL)
    assert packing_problem(qwen, None, False) is None
    assert "paged|eager" in packing_problem(qwen, "paged|eager", False)
    assert "remote-code" in packing_problem(qwen, None, True)
    hybrid = Qwen3Config(**SMALL)
    hybrid.layer_types = ["full_attention", "linear_attention"]
    assert "linear_attention layers" in packing_problem(hybrid, None, False)
    from transformers import MambaConfig

    assert packing_problem(MambaConfig(), None, False).startswith("mamba has")
    assert "OPTForCausalLM builds its attention mask without the position ids" in packing_problem(OPTConfig(), None, False)


def test_bins_hold_whole_rows_first_fit_decreasing():
    assert pack_bins([16, 11, 8, 5, 13]) == [[0], [4], [1, 3], [2]]
    r = ragged_rollouts()  # rows of 16, 11, 8, 5 and 13 tokens
    ids_BL, mask_BL = r.input_ids_BL(), r.attention_mask_BL()
    positions_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    ids_KN, positions_KN, slot_BL = packed_layout(ids_BL, mask_BL.bool(), positions_BL)
    assert ids_KN.shape == (4, 16)
    assert ids_KN.flatten()[slot_BL[mask_BL.bool()]].tolist() == ids_BL[mask_BL.bool()].tolist()
    assert positions_KN[2].tolist() == list(range(11)) + list(range(5))  # rows 1 and 3 share a bin, each from 0
    assert positions_KN[3].tolist() == list(range(16))  # row 2's 8 tokens, then the tail: its own positions 8..15
