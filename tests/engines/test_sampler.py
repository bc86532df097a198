import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config.sections import SamplingConfig
from opd.engines.hf import HFSampler, filter_logits
from opd.models.prompts import encode_prompt
from opd.models.rollouts import left_pad
from opd.models.scoring import rollout_logprobs


@pytest.fixture(scope="module")
def student(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models[1])


def prompts(tokenizer, texts):
    return [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def test_rollout_masks_and_padding(student, tokenizer):
    sampler = HFSampler(student, tokenizer)
    batch = prompts(tokenizer, ["1+2", "345+678", "9+99"])
    r = sampler.sample(batch, SamplingConfig(max_new_tokens=10), torch.Generator().manual_seed(0))
    assert r.prompt_ids_BP.shape == (3, max(len(p) for p in batch))
    assert r.prompt_mask_BP.sum(1).tolist() == [len(p) for p in batch]
    assert r.prompt_mask_BP[:, -1].all()  # left padding: every prompt ends at the last column
    mask = r.completion_mask_BC.bool()
    assert torch.equal(r.loss_mask_BC.bool(), mask)
    for row in range(3):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # contiguous, right-padded
        ids = r.completion_ids_BC[row]
        eos = (ids[:n] == tokenizer.eos_token_id).nonzero()
        assert len(eos) == 0 or (len(eos) == 1 and eos[0].item() == n - 1)  # stops at the first EOS
        assert (ids[n:] == tokenizer.pad_token_id).all()
    assert (r.sampler_logp_BC[~mask] == 0).all() and (r.sampler_logp_BC[mask] <= 0).all()


def test_sampler_logprobs_match_a_full_forward(student, tokenizer):
    """The KV-cached incremental pass and the trainer's padded full pass agree on every token."""
    sampler = HFSampler(student, tokenizer)
    r = sampler.sample(prompts(tokenizer, ["1+2", "345+678", "12+3"]), SamplingConfig(max_new_tokens=12), torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp_BC, entropy_BC = rollout_logprobs(student, r, with_entropy=True)
        assert rollout_logprobs(student, r)[1] is None  # entropy only on request
        full = student(r.input_ids_BL(), attention_mask=r.attention_mask_BL()).logits[:, r.prompt_length - 1 : -1].log_softmax(-1)
    mask = r.completion_mask_BC.bool()
    torch.testing.assert_close(logp_BC[mask], r.sampler_logp_BC[mask], atol=1e-4, rtol=1e-4)
    expected_entropy = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(entropy_BC[mask], expected_entropy[mask], atol=1e-4, rtol=1e-4)


def test_same_generator_seed_same_samples(student, tokenizer):
    sampler = HFSampler(student, tokenizer)
    batch = prompts(tokenizer, ["1+2", "3+4"])
    a = sampler.sample(batch, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(5))
    b = sampler.sample(batch, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(5))
    c = sampler.sample(batch, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(6))
    assert torch.equal(a.completion_ids_BC, b.completion_ids_BC)
    assert not torch.equal(a.completion_ids_BC, c.completion_ids_BC)


def test_greedy_equals_argmax_of_full_forward(student, tokenizer):
    sampler = HFSampler(student, tokenizer)
    r = sampler.sample(prompts(tokenizer, ["12+34"]), SamplingConfig(max_new_tokens=6, temperature=0))
    ids = r.input_ids_BL()
    with torch.no_grad():
        logits = student(ids).logits[0, r.prompt_length - 1 : -1]
    n = int(r.completion_mask_BC.sum())
    assert torch.equal(logits.argmax(-1)[:n], r.completion_ids_BC[0, :n])


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8))
    assert kept_p.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept_p = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.81))
    assert kept_p.tolist() == [[True, True, True, False]]
    kept_tiny = torch.isfinite(filter_logits(logits, top_k=0, top_p=1e-6))
    assert kept_tiny.tolist() == [[True, False, False, False]]


def test_sampling_respects_filters(student, tokenizer):
    sampler = HFSampler(student, tokenizer)
    params = SamplingConfig(max_new_tokens=5, top_k=1)
    r = sampler.sample(prompts(tokenizer, ["1+2"] * 4), params, torch.Generator().manual_seed(0))
    assert (r.completion_ids_BC == r.completion_ids_BC[0]).all()  # top-1 sampling is greedy
    assert torch.allclose(r.sampler_logp_BC, torch.zeros_like(r.sampler_logp_BC))


def test_left_pad_refuses_empty_batch():
    with pytest.raises(ValueError, match="no sequences"):
        left_pad([], 0)
