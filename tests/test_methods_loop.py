"""Every method runs through the one loop on tiny models, and its method-specific wiring does what it says."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_config
from opd.config import ConfigError, SamplingConfig
from opd.models import apply_lora
from opd.config import LoraConfig
from opd.prompts import encode_prompt
from opd.rollout import HFSampler
from opd.scoring import rollout_logprobs
from opd.teachers import AdapterDisabledTeacher
from opd.train import train


def rows(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=opd_plus", "method.opd_plus.divergence=jsd"],
        ["method.name=opd_plus", "method.opd_plus.divergence=forward_kl", "method.opd_plus.unbiased=false"],
        ["method.name=opd_plus", "method.opd_plus.divergence=hellinger", "method.opd_plus.discount=1.0"],
        ["method.name=gopd", "method.gopd.reward_scale=1.25"],
        ["method.name=gopd", "method.gopd.reward_scale=1.25", "student.lora.enabled=true"],
        ["method.name=gopd", "method.gopd.reward_scale=1.0"],
        ["method.name=grpo", "method.grpo.kl_coef=0.05", "method.clip_eps=0.2"],
        ["method.name=sft", "method.sft.source=reference"],
    ],
    ids=["opd_plus_jsd", "opd_fkl_standard", "opd_plus_hellinger_return", "exopd", "exopd_lora", "gopd_lambda1", "grpo_kl", "sft"],
)
def test_method_runs_and_changes_the_student(tmp_path, tiny_models, overrides):
    summary = train(make_config(tmp_path, tiny_models, *overrides))
    assert summary["nonfinite_skips"] == 0
    losses = [r["loss"] for r in rows(tmp_path / "run")]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))


def test_reopold_switches_phase_at_the_configured_step(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, "method.name=reopold", "train.steps=4", "method.reopold.switch_step=2"))
    train_rows = rows(tmp_path / "run")
    assert [r["reopold_phase"] for r in train_rows] == [0.0, 0.0, 1.0, 1.0]
    assert all(0 < r["kept_fraction"] <= 1 for r in train_rows)


def test_adapter_disabled_reference_is_the_initial_student(tiny_models, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    lora = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_models[1]), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # move the adapters away from their zero initialisation
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": "12+34"}])]
    r = HFSampler(base, tokenizer).sample(prompts, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logp, _ = rollout_logprobs(base, r)
        adapted_logp, _ = rollout_logprobs(lora, r)
    reference_logp = AdapterDisabledTeacher(lora).token_logprobs(r)
    torch.testing.assert_close(reference_logp, base_logp)
    assert not torch.allclose(adapted_logp, base_logp)


def test_grpo_needs_a_group():
    with pytest.raises(ConfigError, match="'sampling.samples_per_prompt' must be >= 2 for GRPO"):
        from opd.config import load_config

        load_config(None, ["student.path=x", "method.name=grpo", "sampling.samples_per_prompt=1"])
