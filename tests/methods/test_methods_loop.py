"""Every method runs through the one loop on tiny models, and its method-specific wiring does what it says."""

import json

import pytest
import torch
from conftest import killed_at_step, make_config
from transformers import AutoModelForCausalLM

from opd.config.sections import ConfigError, LoraConfig, SamplingConfig
from opd.engines.hf import HFSampler
from opd.models.loading import apply_lora
from opd.models.prompts import encode_prompt
from opd.models.scoring import rollout_logprobs
from opd.teachers.model import ModelTeacher
from opd.training.loop import train


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
        ["method.name=grpo", "method.grpo.kl_coef=0.05", "method.clip_eps=0.2", "train.updates_per_batch=2"],
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
    reference_logp = ModelTeacher(lora, freeze=False, disable_adapters=True).token_logprobs(r)
    torch.testing.assert_close(reference_logp, base_logp)
    assert not torch.allclose(adapted_logp, base_logp)


def test_grpo_needs_a_group():
    with pytest.raises(ConfigError, match="'sampling.samples_per_prompt' must be >= 2 for grpo's group baseline"):
        from opd.config.loading import load_config

        load_config(None, ["student.path=x", "method.name=grpo", "sampling.samples_per_prompt=1"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.opsd.loss=jsd"],
        ["method.opsd.loss=sampled"],
        ["method.opsd.teacher_weights=ema", "method.opsd.ema_decay=0.5"],
        ["method.opsd.teacher_weights=current", "method.opsd.top_k=5"],
        ["method.opsd.teacher_weights=fixed", "student.lora.enabled=true"],
    ],
    ids=["jsd_fixed", "sampled", "ema", "current_topk", "lora_fixed"],
)
def test_opsd_variants_run(tmp_path, tiny_models, overrides):
    summary = train(make_config(tmp_path, tiny_models, "method.name=opsd", "teacher.path=null", *overrides))
    assert summary["nonfinite_skips"] == 0
    assert all(r["kl"] == r["kl"] for r in rows(tmp_path / "run"))


def test_opsd_teacher_sees_the_reference_solution(tiny_models, tmp_path):
    from opd.methods.batch import Batch
    from opd.methods.data import privileged_view
    from opd.training.assembly import build_session

    s = build_session(make_config(tmp_path, tiny_models, "method.name=opsd", "teacher.path=null"))
    example = s.task.eval_examples()[0]
    r = s.sampler.sample([encode_prompt(s.tokenizer, s.task.messages(example))], s.cfg.sampling, torch.Generator().manual_seed(0))
    view = privileged_view(s, Batch(r, [example], on_policy=True))
    teacher_prompt = s.tokenizer.decode(view.prompt_ids_BP[0][view.prompt_mask_BP[0].bool()])
    assert example.solution in teacher_prompt and example.prompt in teacher_prompt
    assert torch.equal(view.completion_ids_BC, r.completion_ids_BC)


def test_sft_with_privileged_fraction_puts_chosen_rows_behind_the_privileged_prompt(tiny_models, tmp_path):
    import random

    from opd.training.assembly import build_session

    s = build_session(make_config(tmp_path, tiny_models, "method.name=sft", "method.sft.privileged_fraction=0.5"))
    examples = s.task.sample_train(32, random.Random(0))
    batch = s.method.data(s, examples, random.Random(1), torch.Generator())
    r = batch.rollouts
    prompts = [s.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(r.prompt_ids_BP, r.prompt_mask_BP)]
    privileged = [e.solution in p for e, p in zip(examples, prompts)]
    rng = random.Random(1)  # the data source draws one number per example from the step's data RNG
    expected = [rng.random() < 0.5 for _ in examples]
    assert privileged == expected and 0 < sum(privileged) < len(examples)
    for e, p, ids, mask in zip(examples, prompts, r.completion_ids_BC, r.completion_mask_BC):
        assert e.prompt in p
        assert s.tokenizer.decode(ids[mask.bool()]).startswith(e.solution)  # the completion is the plain reply either way


def test_sft_privileged_fraction_needs_reference_solutions(tmp_path):
    with pytest.raises(ConfigError, match="'method.sft.privileged_fraction' needs method.sft.source=reference"):
        make_config(tmp_path, (tmp_path, tmp_path), "method.name=sft", "method.sft.source=teacher", "method.sft.privileged_fraction=0.5")


def test_opsd_resume_with_ema_teacher_is_exact(tmp_path, tiny_models, monkeypatch):
    from safetensors.torch import load_file


    common = ["method.name=opsd", "teacher.path=null", "method.opsd.teacher_weights=ema", "method.opsd.ema_decay=0.5", "train.steps=4", "checkpoint.every=2"]
    train(make_config(tmp_path / "a", tiny_models, *common))
    killed_at_step(monkeypatch, 2, lambda: train(make_config(tmp_path / "b", tiny_models, *common)))
    train(make_config(tmp_path / "b", tiny_models, *common, "run.resume=true"))
    a = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-000004" / "extra.safetensors").is_file()


def test_opsd_refuses_a_separate_teacher_and_missing_privileged_context(tmp_path):
    from opd.config.loading import load_config

    with pytest.raises(ConfigError, match="'teacher.path' must be null for opsd"):
        load_config(None, ["student.path=s", "method.name=opsd", "teacher.path=t"])
    with pytest.raises(ConfigError, match="'task.solution_field' must name the reference-solution field"):
        load_config(None, ["student.path=s", "method.name=opsd", "task.name=math", "task.path=x.jsonl", "task.format=problem", "task.solution_field=null"])


def test_multi_teacher_routing_scores_each_row_with_its_teacher(tmp_path, tiny_models, tokenizer):
    import json as _json

    from opd.methods.base import student_samples
    from opd.training.assembly import build_session

    rows_ = [{"problem": f"{i}+{i}?", "answer": str(2 * i), "domain": "a" if i % 2 else "b"} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(_json.dumps(r) for r in rows_) + "\n")
    teacher, student = tiny_models
    cfg = make_config(
        tmp_path, tiny_models, "method.name=gopd", "method.gopd.reward_scale=1.25", "task.name=math", f"task.path={data}",
        "task.teacher_field=domain", "task.solution_field=null", "teacher.path=null", f"teacher.routes={{a: {teacher}, b: {student}}}",
    )
    s = build_session(cfg)
    batch = student_samples(s, s.task.sample_train(4, __import__("random").Random(0)), torch.Generator().manual_seed(0))
    routed = s.teacher.token_logprobs(batch.rollouts)
    models = {"a": AutoModelForCausalLM.from_pretrained(teacher), "b": AutoModelForCausalLM.from_pretrained(student)}
    for i, route in enumerate(batch.rollouts.route_B):
        with torch.no_grad():
            expected, _ = rollout_logprobs(models[route], batch.rollouts.select([i]))
        torch.testing.assert_close(routed[i : i + 1], expected)
    assert set(batch.rollouts.route_B) == {"a", "b"}
    summary = train(cfg)
    assert summary["nonfinite_skips"] == 0


def test_routing_refusals(tmp_path):
    from opd.config.loading import load_config
    from opd.teachers.routed import RoutedTeacher

    with pytest.raises(ConfigError, match="'teacher.routes' works with the sampled-token methods"):
        load_config(None, ["student.path=s", "method.name=gkd", "teacher.routes={a: x}"])
    with pytest.raises(ConfigError, match="'task.teacher_field' must name the column"):
        load_config(None, ["student.path=s", "method.name=opd", "task.name=math", "task.path=x", "teacher.routes={a: x}"])
    with pytest.raises(ValueError, match="routes to teacher 'c' but teacher.routes has: a"):
        RoutedTeacher({"a": None})._teacher("c")


def test_exopd_without_a_reference_is_refused():
    from opd.config.loading import load_config

    with pytest.raises(ConfigError, match=r"'method.gopd.reference' is required when method.gopd.reward_scale != 1 \(got 1.25\)"):
        load_config(None, ["student.path=s", "teacher.path=t", "method.name=gopd", "method.gopd.reference=null"])
    assert load_config(None, ["student.path=s", "teacher.path=t", "method.name=gopd", "method.gopd.reward_scale=1.0", "method.gopd.reference=null"])


def test_a_top_k_only_teacher_gives_the_dense_top_k_tail_loss(tmp_path, tiny_models):
    """A teacher that reveals only its top-k log-probs (e.g. a served one) plugs into the full-vocabulary loss through
    the Teacher protocol, and gives the loss (and student gradient) of the dense teacher restricted to the same top-k
    with a tail bucket."""
    import random

    from opd.methods.base import student_samples
    from opd.methods.losses import full_vocabulary_loss
    from opd.teachers.base import TopLogprobs
    from opd.training.assembly import build_session

    s = build_session(make_config(tmp_path, tiny_models, "method.name=gkd"))
    batch = student_samples(s, s.task.sample_train(4, random.Random(0)), torch.Generator().manual_seed(0))
    k, tau = 5, 0.9
    dense = s.teacher

    class TopKOnly:  # what a served teacher returns: ids and log-probs of its k best tokens, at the loss temperature
        def distributions(self, rollouts):
            d = dense.distributions(rollouts)
            logp_BCV = (d.project(d.hidden_BCH) / tau).log_softmax(-1)
            top = logp_BCV.topk(k, dim=-1)
            return TopLogprobs(top.indices, top.values)

    def loss_and_grad(teacher, top_k, tail):
        s.teacher = teacher
        s.student.zero_grad()
        loss, metrics = full_vocabulary_loss(s, batch, batch.rollouts, 0.5, tau, None, top_k, tail)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in s.student.parameters() if p.grad is not None], metrics

    dense_loss, dense_grads, dense_metrics = loss_and_grad(dense, k, True)
    sparse_loss, sparse_grads, sparse_metrics = loss_and_grad(TopKOnly(), None, False)
    assert dense_loss > 0
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert abs(sparse_metrics["teacher_topk_mass"] - dense_metrics["teacher_topk_mass"]) < 1e-5
