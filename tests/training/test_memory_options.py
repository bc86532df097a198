"""Memory options that must not change the gradient: activation checkpointing (train.gradient_checkpointing) and
padding-free packing (train.packing), each against the plain run on the same batch; and the options refused before
any weights load."""

import copy
import json
import random

import pytest
import torch
from conftest import make_config
from transformers.modeling_layers import GradientCheckpointingLayer

from opd.config.sections import ConfigError
from opd.tasks.rows import DataError
from opd.training.assembly import build_session
from opd.training.errors import TrainingError
from opd.training.loop import accumulate_gradients

WORLD = ["sampling.samples_per_prompt=2", "sampling.max_new_tokens=24"]
LORA = ["student.lora.enabled=true", "student.lora.r=4"]


def gradients(s, batch):
    s.student.zero_grad(set_to_none=True)
    _, _, finite = accumulate_gradients(s, [copy.deepcopy(batch)], 0)
    assert finite
    return {n: p.grad.clone() for n, p in s.student.named_parameters() if p.grad is not None}


def assert_same_gradients(tmp_path, tiny_models, option: str, *overrides: str):
    torch.manual_seed(0)  # LoRA's initial adapters draw from torch's RNG
    plain = build_session(make_config(tmp_path, tiny_models, *WORLD, *overrides))
    torch.manual_seed(0)
    other = build_session(make_config(tmp_path, tiny_models, *WORLD, *overrides, option))
    batch = plain.method.data(plain, plain.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    lengths = batch.rollouts.completion_lengths_B.tolist() + batch.rollouts.prompt_mask_BP.sum(-1).tolist()
    assert len(set(lengths)) > 2, "rows of different lengths put padding in the plain batch"
    a, b = gradients(plain, batch), gradients(other, batch)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "overrides", [["method.name=opd"], ["method.name=gkd", "method.gkd.lambda_onpolicy=1.0"], ["method.name=opd", *LORA]],
    ids=["opd", "gkd-full-vocabulary", "opd-lora"],
)
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_models, overrides):
    assert_same_gradients(tmp_path, tiny_models, "train.gradient_checkpointing=true", *overrides)


def test_gradient_checkpointing_recomputes_the_layers_in_training_only(tmp_path, tiny_models):
    """The decoder layers run under torch's checkpoint in the loss's forward, and not while the sampler decodes."""
    s = build_session(make_config(tmp_path, tiny_models, *WORLD, "train.gradient_checkpointing=true"))
    layers = [m for m in s.student.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    assert len(layers) == s.student.config.num_hidden_layers
    calls = []
    real = layers[0]._gradient_checkpointing_func
    layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or real(*a, **k)
    batch = s.method.data(s, s.task.sample_train(2, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    assert calls == []  # sampling: eval mode, no gradient, the KV cache kept
    gradients(s, batch)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "overrides",
    [["method.name=opd"], ["method.name=gkd", "method.gkd.lambda_onpolicy=1.0"], ["method.name=grpo"], ["method.name=opd", *LORA]],
    ids=["opd", "gkd-full-vocabulary", "grpo", "opd-lora"],
)
def test_packing_gives_the_same_gradients(tmp_path, tiny_models, overrides):
    assert_same_gradients(tmp_path, tiny_models, "train.packing=true", *overrides)


def test_an_unknown_attention_implementation_is_refused_naming_the_key(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"config key 'student\.attn_implementation' must be one of eager, .*sdpa.* got 'fast'"):
        make_config(tmp_path, tiny_models, "student.attn_implementation=fast")


def test_an_attention_implementation_that_is_not_installed_is_refused(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"'teacher\.attn_implementation' is 'flash_attention_2', which needs the flash_attn package"):
        make_config(tmp_path, tiny_models, "teacher.attn_implementation=flash_attention_2")


def test_packing_with_an_implementation_that_mixes_rows_is_refused_before_weights_load(tmp_path, tiny_models, monkeypatch):
    import opd.training.assembly as assembly

    monkeypatch.setattr(assembly, "load_student", lambda *a: pytest.fail("weights loaded"))
    cfg = make_config(tmp_path, tiny_models, "train.packing=true", "student.attn_implementation=paged|eager")
    with pytest.raises(TrainingError, match=r"config key 'train\.packing' cannot pack rows for the student model: attention implementation 'paged\|eager'"):
        build_session(cfg)


@pytest.mark.parametrize("device, message", [("cuda:3", "CUDA is not available here"), ("tpu", "must be auto, cpu, cuda or cuda:N"), ("auto", "must name a device")])
def test_a_teacher_device_that_does_not_exist_is_refused(tmp_path, tiny_models, device, message):
    with pytest.raises(ConfigError, match=rf"config key 'teacher\.device' .*{message}"):
        make_config(tmp_path, tiny_models, f"teacher.device={device}")


@pytest.mark.parametrize("overrides", [["method.name=sft"], ["method.name=opsd", "teacher.path=null"], ["method.name=grpo", "method.grpo.kl_coef=0.1", *LORA]])
def test_a_teacher_device_with_nothing_to_place_is_refused(tmp_path, tiny_models, overrides):
    with pytest.raises(ConfigError, match=r"config key 'teacher\.device' has nothing to place: method '\w+' loads no local teacher"):
        make_config(tmp_path, tiny_models, "teacher.device=cpu", *overrides)


def test_the_teacher_and_its_reference_score_on_the_teacher_device(tmp_path, tiny_models):
    s = build_session(make_config(tmp_path, tiny_models, "method.name=grpo", "method.grpo.kl_coef=0.1", "teacher.device=cpu"))
    assert s.reference.device == torch.device("cpu")  # the student's initial weights loaded again, where asked


def test_a_micro_batch_budget_smaller_than_the_longest_prompt_is_refused_naming_it(tmp_path, tiny_models, monkeypatch):
    import opd.training.assembly as assembly

    monkeypatch.setattr(assembly, "load_student", lambda *a: pytest.fail("weights loaded"))
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i} + {i * 7}?", "answer": str(8 * i)}) + "\n" for i in range(6)))
    cfg = make_config(tmp_path, tiny_models, "task.name=math", f"task.path={data}", "task.eval_size=2", "train.micro_batch_tokens=12")
    with pytest.raises(DataError, match=r"train\.micro_batch_tokens=12 is smaller than the longest training prompt \(\d\d+ tokens, .*math\.jsonl:\d\)"):
        build_session(cfg)
