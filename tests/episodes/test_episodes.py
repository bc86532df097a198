"""Multi-turn episodes: the driver's token bookkeeping (ids only grow, observation tokens untrained, the rendering
of the conversation equals the row's text), tool results from a real BM25 index, malformed calls, the turn and
token limits, stop strings in opd's own sampler on a real model, and a one-turn task equal to plain sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import SEARCH, TOOL_TEMPLATE, ScriptedPolicy

from opd.config.sections import SamplingConfig
from opd.engines.hf import HFSampler
from opd.episodes.driver import EpisodeError, run_episodes
from opd.episodes.environments import EpisodeLimits, OneTurn, ToolEnvironment
from opd.episodes.search import BM25Index, Passage
from opd.episodes.tool_calls import SearchTool
from opd.tasks.base import Example
from opd.worlds.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tool_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


class QA:
    """A task: the question as the user's message, exact answer somewhere in the final reply."""

    def messages(self, example):
        return [{"role": "user", "content": example.prompt}]

    def reward(self, text, example):
        return float(example.answer in text)


CORPUS = [
    Passage("1", "Mirentor", "Mirentor is a city founded in 1204 by the guild of Shovax."),
    Passage("2", "Kalo", "The Kalo river flows past Mirentor into the grey sea."),
    Passage("3", "Shovax", "The guild of Shovax built ships and traded salt."),
]


def driver(tokenizer, examples, scripts, limits=EpisodeLimits(max_turns=4, max_tokens=600), tools=None):
    tools = tools if tools is not None else [SearchTool(BM25Index(CORPUS), k=1)]
    envs = [ToolEnvironment(QA(), e, tools) for e in examples]
    prompts = [tokenizer(tokenizer.apply_chat_template(env.start(), tools=env.tools(), tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for env in envs]
    policy = ScriptedPolicy(tokenizer, prompts, scripts)
    episodes = run_episodes(envs, policy, tokenizer, SamplingConfig(max_new_tokens=200), limits)
    return episodes, policy


def row_tokens(episodes, i):
    r = episodes.rollouts
    n = int(r.completion_mask_BC[i].sum())
    return r.completion_ids_BC[i, :n].tolist(), r.loss_mask_BC[i, :n].tolist()


def test_a_search_episode_trains_the_agents_tokens_only_and_its_ids_spell_the_conversation(tool_tokenizer):
    tok = tool_tokenizer
    examples = [Example("When was Mirentor founded?", "1204"), Example("Where does the Kalo flow?", "grey sea")]
    scripts = [[SEARCH + " and more text after the stop", "It was founded in 1204."], ["The grey sea, I think."]]
    episodes, policy = driver(tok, examples, scripts)

    assert episodes.rewards == [1.0, 1.0] and episodes.turns == [2, 1] and episodes.tool_calls == [1, 0] and episodes.cut == [None, None]
    assert episodes.messages[0][2] == {"role": "tool", "name": "search", "content": "Doc 1 (Mirentor): " + CORPUS[0].text}
    ids, trained = row_tokens(episodes, 0)
    agent = [t for t, m in zip(ids, trained) if m]
    observation = [t for t, m in zip(ids, trained) if not m]
    # trained: exactly what the policy wrote (the first turn cut at the stop string; the last closed by its EOS)
    assert tok.decode(agent, skip_special_tokens=False) == SEARCH + "It was founded in 1204.<eos>"
    assert "Doc 1 (Mirentor)" in tok.decode(observation, skip_special_tokens=False)
    # the row's ids spell the template's rendering of the whole conversation, closing EOS included
    prompt = episodes.rollouts.prompt_ids_BP[0][episodes.rollouts.prompt_mask_BP[0].bool()].tolist()
    rendered = tok.apply_chat_template(episodes.messages[0], tools=[SearchTool(None).schema()], tokenize=False)
    assert tok.decode(prompt + ids, skip_special_tokens=False) == rendered
    # each turn's input extends the previous turn's: ids only grow
    first, second = policy.inputs[0]
    assert second[: len(first)] == first and len(second) > len(first)
    # the sampler's log-probs sit on the agent's tokens; observation positions hold 0
    logp = episodes.rollouts.sampler_logp_BC[0, : len(ids)]
    assert torch.equal(logp != 0, torch.tensor(trained, dtype=torch.bool))


def test_a_malformed_call_is_answered_and_counted_and_the_episode_goes_on(tool_tokenizer):
    scripts = [['<tool_call>{"name": "search", "arguments": {"query": }}</tool_call>', '<tool_call>{"name": "browse", "arguments": {}}</tool_call>', "1204"]]
    episodes, _ = driver(tool_tokenizer, [Example("When was Mirentor founded?", "1204")], scripts)
    assert episodes.turns == [3] and episodes.failed_calls == [2] and episodes.tool_calls == [1] and episodes.rewards == [1.0]
    problems = [m["content"] for m in episodes.messages[0] if m["role"] == "tool"]
    assert "not valid JSON" in problems[0] and "no tool 'browse'" in problems[1]


def test_max_turns_and_max_tokens_cut_an_episode(tool_tokenizer):
    loop = [[SEARCH] * 10]
    episodes, _ = driver(tool_tokenizer, [Example("q?", "1204")], loop, EpisodeLimits(max_turns=3, max_tokens=10_000))
    assert episodes.turns == [3] and episodes.cut == ["max_turns"] and episodes.rewards == [0.0]
    episodes, _ = driver(tool_tokenizer, [Example("q?", "1204")], loop, EpisodeLimits(max_turns=10, max_tokens=150))
    assert episodes.cut == ["max_tokens"] and int(episodes.rollouts.completion_mask_BC.sum()) == 150
    assert episodes.metrics()["episode_cut_fraction"] == 1.0


def test_a_template_that_rewrites_earlier_turns_still_extends_the_ids_the_model_saw():
    """Like Qwen3, which drops the reasoning of earlier assistant turns when it renders later ones."""
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE.replace(
        "{{ message['content'] }}{{ eos_token }}", "{{ message['content'] if loop.last else message['content'].split('</think>')[-1] }}{{ eos_token }}"
    )
    first = "<think>look it up</think>" + SEARCH
    episodes, policy = driver(tok, [Example("When was Mirentor founded?", "1204")], [[first, "Answer: 1204"]])
    assert episodes.rewards == [1.0] and episodes.turns == [2]
    ids, trained = row_tokens(episodes, 0)
    assert tok.decode([t for t, m in zip(ids, trained) if m], skip_special_tokens=False) == first + "Answer: 1204<eos>"
    first_input, second_input = policy.inputs[0]
    assert second_input[: len(first_input)] == first_input
    assert tok.decode(second_input[len(first_input) :], skip_special_tokens=False).startswith(first)  # the reasoning the model wrote stays


def test_a_template_that_does_not_render_replies_verbatim_is_refused():
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE.replace("{{ message['content'] }}{{ eos_token }}", "{{ message['content'] | upper }}{{ eos_token }}")
    with pytest.raises(EpisodeError, match="does not render an assistant reply as it is"):
        driver(tok, [Example("q?", "1204")], [[SEARCH, "1204"]])


def test_the_context_bounds_an_episode(tool_tokenizer):
    tok = tool_tokenizer
    envs = [ToolEnvironment(QA(), Example("q?", "1204"), [SearchTool(BM25Index(CORPUS), k=1)])]
    prompt = tok(tok.apply_chat_template(envs[0].start(), tools=envs[0].tools(), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    policy = ScriptedPolicy(tok, [prompt], [[SEARCH] * 10])
    episodes = run_episodes(envs, policy, tok, SamplingConfig(max_new_tokens=200), EpisodeLimits(max_turns=10, max_tokens=10_000), context=len(prompt) + 120)
    assert episodes.cut == ["context"] and int(episodes.rollouts.completion_mask_BC.sum()) == 120


@pytest.fixture(scope="module")
def tiny_student(tiny_models):
    from opd.models.loading import load_model

    return load_model(str(tiny_models[1]), "student.path")


def test_the_hf_sampler_stops_a_row_at_a_stop_string(tiny_student, tokenizer):
    sampler = HFSampler(tiny_student, tokenizer)
    prompts = [tokenizer("<|user|>hello<|assistant|>", add_special_tokens=False)["input_ids"]] * 16
    params = SamplingConfig(max_new_tokens=40, temperature=1.5)
    free = sampler.sample(prompts, params, torch.Generator().manual_seed(0))
    stopped = sampler.sample(prompts, params, torch.Generator().manual_seed(0), stop=("e", "a"))
    hits = 0
    for full, cut in zip(free.texts, stopped.texts):
        first = min([full.index(s) + 1 for s in "ea" if s in full], default=None)
        assert cut == (full[:first] if first else full)  # the same sample, ended right after the first stop string
        hits += first is not None
    assert hits >= 4


def test_a_one_turn_task_is_plain_sampling(tiny_student, tokenizer):
    from opd.config.loading import load_config
    from opd.tasks import build_task

    task = build_task(load_config(None, ["student.path=x", "teacher.path=y"]).task, 0)
    examples = task.eval_examples()[:6]
    sampler = HFSampler(tiny_student, tokenizer)
    params = SamplingConfig(max_new_tokens=12)
    episodes = run_episodes([OneTurn(task, e) for e in examples], sampler, tokenizer, params, EpisodeLimits(stop=()), torch.Generator().manual_seed(3))
    prompts = [tokenizer(tokenizer.apply_chat_template(task.messages(e), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for e in examples]
    plain = sampler.sample(prompts, params, torch.Generator().manual_seed(3))
    assert torch.equal(episodes.rollouts.completion_ids_BC, plain.completion_ids_BC)
    assert torch.equal(episodes.rollouts.loss_mask_BC, plain.loss_mask_BC)
    assert episodes.rewards == [task.reward(t, e) for t, e in zip(plain.texts, examples)]
