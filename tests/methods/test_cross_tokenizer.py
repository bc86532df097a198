"""A teacher with a tokenizer of its own (teacher.tokenizer=own, teachers/cross_tokenizer.py).

- With the student's own tokenizer read as the teacher's, every span is one token and the losses and gradients are
  those of the shared-tokenizer path, bit for bit, for every sampled-token method that takes it.
- With a byte-level BPE teacher whose chat template differs from the student's, the gradient is the one of an
  independent formula: every student token of a span (a teacher token's characters, here) is trained with
  A = −(Σ_span ℓ^S − ℓ^T(teacher token)), the teacher's log-prob taken from its own forward pass over the prompt in
  its own chat template and its own split of the completion's text.
- The pairing check's refusal of a different vocabulary names teacher.tokenizer, and the key refuses what it does
  not cover yet.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import TINY, TINY_SPEC, TOOL_TEMPLATE, make_config

from opd.config.sections import ConfigError
from opd.models.pairing import PairingError
from opd.training.assembly import build_session
from opd.training.loop import SUMMED_METRICS, accumulate_gradients
from opd.worlds.build.common import init_model
from opd.worlds.tokenizer import build_byte_bpe_tokenizer, build_char_tokenizer

SAMPLED = ["sampling.samples_per_prompt=2", "sampling.max_new_tokens=16", "method.reduction=token_mean"]


def step_gradients(s, batches):
    s.student.zero_grad(set_to_none=True)
    sums, counts, finite = accumulate_gradients(s, batches, 0)
    assert finite
    return [p.grad.clone() for p in s.student.parameters() if p.grad is not None], s.ranks.merge_metrics(sums, counts, SUMMED_METRICS)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=opd"],
        ["method.name=opd", "method.opd.discount=0.9"],
        ["method.name=gopd", "method.gopd.reward_scale=1.25"],
        ["method.name=opd_plus", "method.opd_plus.divergence=forward_kl"],
        ["method.name=opd_task_reward"],
        ["method.name=reopold", "method.reopold.switch_step=0"],
    ],
    ids=["opd", "opd_discounted", "exopd", "opd_plus_forward_kl", "opd_task_reward", "reopold_entropy_selection"],
)
def test_the_students_tokenizer_read_as_the_teachers_own_gives_the_shared_gradient(tmp_path, tiny_models, overrides):
    shared = build_session(make_config(tmp_path / "shared", tiny_models, *SAMPLED, *overrides))
    own = build_session(make_config(tmp_path / "own", tiny_models, *SAMPLED, *overrides, "teacher.tokenizer=own"))
    batch = shared.method.data(shared, shared.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    assert len(set(batch.rollouts.completion_lengths_B.tolist())) > 1  # rows of different lengths: padding is exercised
    expected, expected_metrics = step_gradients(shared, [copy.deepcopy(batch)])
    got, metrics = step_gradients(own, [copy.deepcopy(batch)])
    assert len(expected) == len(got) > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert metrics["loss"] == expected_metrics["loss"] and metrics["kl"] == expected_metrics["kl"]
    assert metrics["spans_per_token"] == 1.0


# a chat template of the teacher's own, unlike the student's (<|user|>…<|assistant|>): it closes a reply with <|user|>, not
# with its EOS, as Gemma closes one with <end_of_turn>
TEACHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                    "{% if m['role'] == 'assistant' %}<|user|>{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory):
    """A tiny random Llama whose tokenizer is a byte-level BPE trained on the arithmetic world's kind of text, with
    a chat template of its own."""
    texts = [f"{a % 10}+{b % 10}={a % 10 + b % 10},{a}+{b}|{a + b}" for a in range(100, 999, 7) for b in range(100, 999, 53)]
    tokenizer = build_byte_bpe_tokenizer(texts, vocab_size=300)
    tokenizer.chat_template = TEACHER_TEMPLATE
    return init_model(tmp_path_factory.mktemp("bpe") / "teacher", TINY, tokenizer, TINY_SPEC, seed=3)


def test_a_byte_bpe_teacher_trains_each_span_with_its_own_advantage(tmp_path, tiny_models, bpe_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = build_session(make_config(tmp_path, tiny_models, *SAMPLED, "method.name=opd", f"teacher.path={bpe_teacher}", "teacher.tokenizer=own",
                                  "student.path=world:student", "sampling.max_new_tokens=40"))  # completions the BPE has merges for
    batch = s.method.data(s, s.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    got, metrics = step_gradients(s, [copy.deepcopy(batch)])
    assert 0.3 < metrics["spans_per_token"] < 1.0  # the teacher merges characters: fewer spans than student tokens

    teacher_tok = AutoTokenizer.from_pretrained(bpe_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(bpe_teacher).eval()
    r = batch.rollouts
    s.student.zero_grad(set_to_none=True)
    surrogate, trained = 0.0, 0
    for b, example in enumerate(batch.examples):
        prompt = r.prompt_ids_BP[b][r.prompt_mask_BP[b].bool()].tolist()
        completion = r.completion_ids_BC[b][r.completion_mask_BC[b].bool()].tolist()
        logits = s.student(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        logp_C = logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        text = s.tokenizer.decode(completion, skip_special_tokens=True)
        encoded = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t_ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        ends_with_eos = completion[-1] == s.tokenizer.eos_token_id
        rendered = teacher_tok.apply_chat_template(s.task.messages(example), tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<bos>user: ") and rendered.endswith("\nassistant: ")  # the teacher's own template
        t_prompt = teacher_tok(rendered, add_special_tokens=False)["input_ids"]
        t_completion = t_ids + ([teacher_tok.convert_tokens_to_ids("<|user|>")] if ends_with_eos else [])  # its template's reply end
        with torch.no_grad():
            t_logits = teacher(torch.tensor([t_prompt + t_completion])).logits[0, len(t_prompt) - 1 : -1]
        t_logp = t_logits.log_softmax(-1).gather(1, torch.tensor(t_completion)[:, None])[:, 0]
        # the student is character-level: a teacher token's span is the characters its offsets cover, one token each
        groups = [list(range(start, end)) for start, end in offsets] + ([[len(text)]] if ends_with_eos else [])
        assert sum(len(g) for g in groups) == len(completion)
        for k, group in enumerate(groups):
            advantage = -(float(logp_C[group].detach().sum()) - float(t_logp[k]))
            surrogate = surrogate + advantage * logp_C[group].sum()
        trained += len(completion)
    (-surrogate / trained).backward()
    expected = [p.grad.clone() for p in s.student.parameters() if p.grad is not None]
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_different_vocabulary_is_refused_naming_teacher_tokenizer(tmp_path, tiny_models, bpe_teacher):
    with pytest.raises(PairingError, match="teacher.tokenizer=own"):
        build_session(make_config(tmp_path, tiny_models, "method.name=opd", f"teacher.path={bpe_teacher}"))


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["method.name=ovd"], "not 'ovd'"),
        (["method.name=gkd", "method.gkd.top_k=5"], "method.gkd.top_k"),
        (["method.name=gkd", "method.gkd.seq_kd=true"], "method.gkd.seq_kd"),
        (["teacher.path=null", "teacher.url=http://127.0.0.1:9"], "teacher.tokenizer_path"),
        (["method.name=gkd", "method.gkd.temperature=1", "teacher.path=null", "teacher.url=http://127.0.0.1:9", "teacher.tokenizer_path=/t"],
         "sampled-token log-probs only"),
        (["teacher.tokenizer=/models/qwen"], "teacher.tokenizer_path"),
        (["teacher.routes={a: /x, b: 'http://127.0.0.1:9'}"], "teacher.routes.b"),
        (["method.name=gopd", "method.gopd.reference=/models/base"], "method.gopd.reference"),
    ],
)
def test_what_teacher_tokenizer_own_does_not_cover_yet_is_one_line(tmp_path, tiny_models, overrides, named):
    with pytest.raises(ConfigError, match="teacher.tokenizer") as err:
        make_config(tmp_path, tiny_models, "teacher.tokenizer=own", *overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["projection", "hybrid"])
@pytest.mark.parametrize("lambda_onpolicy", [1.0, 0.0], ids=["on_policy", "reference_solutions"])
def test_gkd_with_the_students_tokenizer_read_as_the_teachers_own_gives_the_shared_gradient(tmp_path, tiny_models, lambda_onpolicy, mode):
    """Every span is one token and every token maps to itself: the projection and the hybrid are both GKD's D_β (to
    float rounding: they renormalise over the tokens mapped or matched, here all of them, and take autograd's
    gradient, not the fused one)."""
    overrides = [*SAMPLED, "method.name=gkd", "method.gkd.beta=0.5", f"method.gkd.lambda_onpolicy={lambda_onpolicy}"]
    shared = build_session(make_config(tmp_path / "shared", tiny_models, *overrides))
    own = build_session(make_config(tmp_path / "own", tiny_models, *overrides, "teacher.tokenizer=own", f"method.gkd.cross_vocab={mode}"))
    if mode == "hybrid":
        assert len(own.teacher.match.student_rest_U) == 0 and len(own.teacher.match.teacher_rest_W) == 0
    else:
        assert own.teacher.match.student_of_W.tolist() == list(range(len(own.teacher.match.student_of_W)))
    examples = shared.task.sample_train(4, random.Random(0))
    batch = shared.method.data(shared, examples, random.Random(1), torch.Generator().manual_seed(0))
    expected, expected_metrics = step_gradients(shared, [copy.deepcopy(batch)])
    got, metrics = step_gradients(own, [copy.deepcopy(batch)])
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert metrics["jsd"] == pytest.approx(expected_metrics["jsd"], rel=1e-5)
    assert metrics["aligned_tokens"] == 1.0
    assert metrics["hybrid_unmatched"] == 0.0 if mode == "hybrid" else metrics["teacher_mapped_mass"] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["projection", "hybrid"])
def test_gkd_with_a_byte_bpe_teacher_compares_the_positions_where_both_read_the_same_text(tmp_path, tiny_models, bpe_teacher, mode):
    """Projection: every student token is set beside the teacher token it starts in, after the same text, with the
    part of that teacher token the student has written already as its prefix ("6" for the "," of "6,"). Hybrid: only
    the spans of one token on each side, where the teacher's token writes the student's character. The loss trains
    the student."""
    from transformers import AutoTokenizer

    s = build_session(make_config(tmp_path, tiny_models, *SAMPLED, "method.name=gkd", "method.gkd.lambda_onpolicy=1.0",
                                  f"teacher.path={bpe_teacher}", "teacher.tokenizer=own", "student.path=world:student",
                                  "sampling.max_new_tokens=40", f"method.gkd.cross_vocab={mode}"))
    teacher_tok = AutoTokenizer.from_pretrained(bpe_teacher)
    batch = s.method.data(s, s.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    aligned = s.teacher.aligned_distributions(batch.rollouts, batch.examples, every_token=mode == "projection")
    r, checked, inside = batch.rollouts, 0, 0
    for b in range(r.completion_ids_BC.shape[0]):
        completion = r.completion_ids_BC[b][r.completion_mask_BC[b].bool()].tolist()
        text = s.tokenizer.decode(completion, skip_special_tokens=True)
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        for c, u in enumerate(aligned.column_BC[b].tolist()):
            if u < 0 or c >= len(completion) or completion[c] == s.tokenizer.eos_token_id:
                continue
            prefix = aligned.prefixes[int(aligned.key_BC[b, c])]
            teacher_text, student_text = teacher_tok.decode([t_ids[u]]), s.tokenizer.decode([completion[c]])
            assert teacher_text.startswith(prefix + student_text) and (mode == "projection" or teacher_text == student_text)
            assert teacher_tok.decode(t_ids[:u]) + prefix == s.tokenizer.decode(completion[:c])  # after the same text
            checked, inside = checked + 1, inside + bool(prefix)
    assert checked > 0 and (inside > 0) == (mode == "projection")  # the projection also trains the inside of merged tokens
    got, metrics = step_gradients(s, [copy.deepcopy(batch)])
    assert metrics["aligned_tokens"] == 1.0 if mode == "projection" else 0.0 < metrics["aligned_tokens"] < 1.0
    assert metrics["hybrid_unmatched"] > 0.0 if mode == "hybrid" else 0.0 < metrics["teacher_mapped_mass"] <= 1.0 + 1e-6  # (random: bytes of no character)
    assert any(float(g.abs().sum()) > 0 for g in got)


def test_a_teacher_tokenizer_without_a_chat_template_is_refused_before_its_weights_load(tmp_path, tiny_models, bpe_teacher):
    import shutil

    teacher = shutil.copytree(bpe_teacher, tmp_path / "teacher")
    (teacher / "chat_template.jinja").unlink()
    (teacher / "model.safetensors").write_bytes(b"not weights")  # never read: the tokenizer is refused first
    with pytest.raises(PairingError, match="teacher.path: .*teacher.tokenizer=own.*no chat template"):
        build_session(make_config(tmp_path, tiny_models, "method.name=opd", f"teacher.path={teacher}", "teacher.tokenizer=own"))


def test_a_teacher_template_that_refuses_the_tasks_turns_is_one_line_before_its_weights_load(tmp_path, tiny_models, bpe_teacher):
    """A task with a system prompt and a teacher whose template refuses system turns (as Gemma-2's does)."""
    import json
    import shutil

    teacher = shutil.copytree(bpe_teacher, tmp_path / "teacher")
    (teacher / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}: {% endif %}")
    (teacher / "model.safetensors").write_bytes(b"not weights")  # never read
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+{a}", "answer": str(2 * a)}) + "\n" for a in range(20)))
    with pytest.raises(PairingError, match="cannot render this task's prompts: TemplateError: System role not supported"):
        build_session(make_config(tmp_path, tiny_models, "method.name=opd", f"teacher.path={teacher}", "teacher.tokenizer=own",
                                  "task.name=math", f"task.path={data}", "task.system_prompt=Be brief."))


def test_a_copy_past_the_teachers_context_keeps_the_spans_that_fit_and_leaves_the_rest_untrained(tmp_path, tiny_models, bpe_teacher):
    """The teacher's context counts its own tokens. A row whose teacher copy runs past it keeps the whole spans that
    fit, scored exactly as without the cut (a causal teacher's prefix does not see what follows); the student tokens
    of the spans cut are in no span; the teacher is never given more positions than its context."""
    s = build_session(make_config(tmp_path, tiny_models, *SAMPLED, "method.name=opd", f"teacher.path={bpe_teacher}", "teacher.tokenizer=own",
                                  "student.path=world:student", "sampling.max_new_tokens=40"))
    assert s.teacher.context == 128  # the teacher's max_position_embeddings, in its own tokens
    batch = s.method.data(s, s.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    lengths, prompts = [], []
    score = s.teacher.teacher.token_logprobs

    def recording(r, t=1.0):
        lengths.append(int((r.prompt_mask_BP.sum(1) + r.completion_mask_BC.sum(1)).max()))
        prompts.append(int(r.prompt_mask_BP.sum(1).max()))
        return score(r, t)

    s.teacher.teacher.token_logprobs = recording
    whole = s.teacher.span_scores(batch.rollouts, batch.examples)
    context = prompts[0] + 6  # a few spans of each row fit
    assert lengths[0] > context
    s.teacher.context = context
    cut = s.teacher.span_scores(batch.rollouts, batch.examples)
    assert lengths[1] <= context  # no row's tokens (so no position) past the context
    mask_BC = batch.rollouts.completion_mask_BC.bool()
    kept_BC = cut.last_BC | (cut.end_BC != torch.arange(mask_BC.shape[1]))
    assert (kept_BC <= mask_BC).all() and 0 < int(kept_BC.sum()) < int(mask_BC.sum())
    assert cut.cut_tokens == int(mask_BC.sum() - kept_BC.sum())
    for b in range(mask_BC.shape[0]):  # the kept tokens are a prefix of each row, and their spans are the whole run's
        kept = int(kept_BC[b].sum())
        assert kept_BC[b, :kept].all()
        assert torch.equal(cut.end_BC[b, :kept], whole.end_BC[b, :kept]) and torch.equal(cut.last_BC[b, :kept], whole.last_BC[b, :kept])
        torch.testing.assert_close(cut.teacher_logp_BC[b, :kept], whole.teacher_logp_BC[b, :kept], rtol=1e-5, atol=1e-5)
    s.teacher.context = 3  # shorter than the teacher's prompt: nothing of any row is scored, and nothing breaks
    none = s.teacher.span_scores(batch.rollouts, batch.examples)
    assert not none.last_BC.any() and none.cut_tokens == int(mask_BC.sum()) and lengths[2] <= 3


def test_routes_of_their_own_tokenizers_score_each_row_with_its_own_teacher(tmp_path, tiny_models, bpe_teacher):
    """teacher.routes with teacher.tokenizer=own: each row's spans and span log-probs are its route's own (a byte-level
    BPE teacher for one family, a teacher of the student's tokenizer for the other), and the routed run trains."""
    import json

    from opd.training.loop import train

    teacher, _ = tiny_models
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+{a}", "answer": str(2 * a), "domain": "ab"[a % 2]}) + "\n" for a in range(100, 140)))
    common = [*SAMPLED, "method.name=opd", "teacher.tokenizer=own", "task.name=math", f"task.path={data}", "task.solution_field=null",
              "student.path=world:student", "sampling.max_new_tokens=40"]  # completions the BPE has merges for
    cfg = make_config(tmp_path / "routed", tiny_models, *common, "teacher.path=null", "task.teacher_field=domain",
                      f"teacher.routes={{a: {bpe_teacher}, b: {teacher}}}")
    s = build_session(cfg)
    alone = {"a": build_session(make_config(tmp_path / "a", tiny_models, *common, f"teacher.path={bpe_teacher}")).teacher,
             "b": build_session(make_config(tmp_path / "b", tiny_models, *common, f"teacher.path={teacher}")).teacher}
    batch = s.method.data(s, s.task.sample_train(6, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    routes = batch.rollouts.route_B
    assert set(routes) == {"a", "b"}
    routed = s.teacher.span_scores(batch.rollouts, batch.examples)
    for i, route in enumerate(routes):
        own = alone[route].span_scores(batch.rollouts.select([i]), [batch.examples[i]])
        torch.testing.assert_close(routed.teacher_logp_BC[i : i + 1], own.teacher_logp_BC)
        assert torch.equal(routed.last_BC[i : i + 1], own.last_BC) and torch.equal(routed.end_BC[i : i + 1], own.end_BC)
    spans_a = int(routed.last_BC[[i for i, r in enumerate(routes) if r == "a"]].sum())
    tokens_a = int(batch.rollouts.completion_mask_BC[[i for i, r in enumerate(routes) if r == "a"]].sum())
    assert spans_a < tokens_a  # the BPE route merges characters; the other route's spans are its tokens
    summary = train(cfg)
    assert summary["nonfinite_skips"] == 0


def played_episodes():
    """Two scripted search episodes of the character tokenizer behind the tool template (tests/episodes' driver): one
    of two turns (a tool call cut at its stop string, then an answer closed by EOS), one of a single answer; and the
    examples with the episodes they played."""
    from conftest import SEARCH
    from episodes.test_episodes import driver

    from opd.tasks.base import Example

    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    examples = [Example("When was Mirentor founded?", "1204"), Example("Where does the Kalo flow?", "grey sea")]
    episodes, _ = driver(tok, examples, [[SEARCH, "It was founded in 1204."], ["The grey sea, I think."]])
    return tok, episodes, episodes.played(examples)


def test_a_tool_episode_read_by_the_students_own_tokenizer_is_its_own_ids_and_scores(tiny_models):
    """A teacher that renders each episode again in its own template and tokens, given the student's template and
    tokenizer: its copy is the row's own ids, every agent token is a span of one, the tool results are in no span,
    and the span log-probs are the teacher's log-probs of the student's tokens, bit for bit."""
    from transformers import AutoModelForCausalLM

    from opd.teachers.cross_tokenizer import CrossTokenizerTeacher
    from opd.teachers.model import ModelTeacher

    tok, episodes, played = played_episodes()
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0])
    teacher = CrossTokenizerTeacher(ModelTeacher(model), tok, tok, lambda e: [], None, [tok.eos_token_id])
    r = episodes.rollouts
    copy_, spans, cut = teacher._teacher_copy(r, played)
    assert cut == 0 and torch.equal(copy_.prompt_ids_BP, r.prompt_ids_BP) and torch.equal(copy_.completion_ids_BC, r.completion_ids_BC)
    scores = teacher.span_scores(r, played)
    trained = r.loss_mask_BC.bool()
    assert torch.equal(scores.last_BC, trained)  # one span per agent token; observations and padding in none
    expected = ModelTeacher(model).token_logprobs(r)
    assert torch.equal(scores.teacher_logp_BC[trained], expected[trained])


EPISODE_TEMPLATE = ("{{ bos_token }}{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
                    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}<|user|>{% endif %}"
                    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_tool_episode_is_rendered_again_in_the_teachers_template_and_aligned_turn_by_turn(tiny_models, bpe_teacher):
    """A byte-level BPE teacher with a template of its own: its copy of each episode is its template's rendering of the
    whole conversation (tool results included), and every span joins student and teacher tokens of the same text of
    one agent turn; the tool results are context, in no span."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.episodes.tool_calls import SearchTool
    from opd.teachers.cross_tokenizer import CrossTokenizerTeacher
    from opd.teachers.model import ModelTeacher

    tok, episodes, played = played_episodes()
    teacher_tok = AutoTokenizer.from_pretrained(bpe_teacher)
    teacher_tok.chat_template = EPISODE_TEMPLATE
    teacher = CrossTokenizerTeacher(ModelTeacher(AutoModelForCausalLM.from_pretrained(bpe_teacher)), tok, teacher_tok, lambda e: [], None,
                                    [tok.eos_token_id])
    r = episodes.rollouts
    copy_, spans, _ = teacher._teacher_copy(r, played)
    for b, messages in enumerate(episodes.messages):
        prompt = copy_.prompt_ids_BP[b][copy_.prompt_mask_BP[b].bool()].tolist()
        completion = copy_.completion_ids_BC[b][copy_.completion_mask_BC[b].bool()].tolist()
        rendered = teacher_tok.apply_chat_template(messages, tools=[SearchTool(None).schema()], tokenize=False)
        assert teacher_tok.decode(prompt + completion, skip_special_tokens=False) + "\n" == rendered  # up to its last line end
        student = r.completion_ids_BC[b].tolist()
        student_cols, teacher_cols = spans[b].members(spans[b].student_cols, spans[b].student_span), spans[b].members(spans[b].teacher_cols, spans[b].teacher_span)
        for s_cols, t_cols in zip(student_cols, teacher_cols):
            s_text = tok.decode([student[c] for c in s_cols], skip_special_tokens=False).replace("<eos>", "")
            t_text = teacher_tok.decode([completion[c] for c in t_cols], skip_special_tokens=False).replace("<|user|>", "")
            assert s_text == t_text
        trained = [c for c, m in enumerate(r.loss_mask_BC[b].tolist()) if m]
        assert sorted(spans[b].student_cols) == trained  # every agent token in a span, no observation token
    assert "Doc 1 (Mirentor)" in teacher_tok.decode(copy_.completion_ids_BC[0].tolist())
    assert spans[0].count < len(spans[0].student_cols)  # the BPE merges characters of the replies


def test_the_teachers_reply_end_stands_for_the_token_the_students_template_closes_a_reply_with(tmp_path, tiny_models, bpe_teacher):
    """A student with two ids that end its turn (as Qwen's <|endoftext|> and <|im_end|>), the lower one not what its
    template closes a reply with: the teacher's reply end maps to the template's, for the projection and the hybrid."""
    import json
    import shutil

    student = shutil.copytree(tiny_models[1], tmp_path / "student")
    config = json.loads((student / "generation_config.json").read_text())
    tok = build_char_tokenizer()
    (student / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [tok.bos_token_id, tok.eos_token_id]}))
    for mode in ("projection", "hybrid"):
        s = build_session(make_config(tmp_path / mode, tiny_models, "method.name=gkd", f"teacher.path={bpe_teacher}", "teacher.tokenizer=own",
                                      f"student.path={student}", f"method.gkd.cross_vocab={mode}"))
        assert s.teacher.student_eos == {tok.bos_token_id, tok.eos_token_id} and len(s.teacher.teacher_end) == 1
        end = s.teacher.teacher_end[0]
        if mode == "projection":
            assert int(s.teacher.match.student_of_W[end]) == tok.eos_token_id
        else:
            pairs = dict(zip(s.teacher.match.teacher_M.tolist(), s.teacher.match.student_M.tolist()))
            assert pairs[end] == tok.eos_token_id
