"""Question answering with a search tool, over several turns: the users'-data task for tool-using agents.

``task.name=search_qa``: questions JSONL (``question``, and ``answer`` or a list ``answers``), searched
in a corpus JSONL (``id``, ``title``, ``text``; BM25 over SQLite FTS5) or through a Search-R1
``/retrieve`` server (``task.retriever_url``). Each example is an episode (``environment``): the
model may call ``search`` in the Hermes / Qwen ``<tool_call>`` format for up to ``task.max_turns``
turns, and its first turn without a call is its answer. The reward is exact match (SQuAD
normalisation: lower case, no punctuation, no articles, single spaces) of the text after the last
``Answer:`` (the whole turn if there is none) against any gold answer. A row may also carry scripted assistant
``turns`` (tool calls, then the answer): SFT (``method.sft.source=reference``) plays them as episodes and trains on
them, the observations between them the search's own.
"""

from __future__ import annotations

import logging
import os
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..config.sections import require, validate_outage
from ..episodes.environments import EpisodeLimits, EpisodicTask, ToolEnvironment
from ..episodes.search import BM25Index, HTTPRetriever, Passage
from ..episodes.tool_calls import CLOSE, SearchTool, parse_tool_calls
from ..services.http import OutagePolicy
from .base import Example, RewardsOneByOne, TaskConfig, episodes_lack, register_task
from .rows import DataError, read_rows, world_file
from .splits import FixedSplits

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "Answer the question. You may search a knowledge base first: write "
    '<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call> and the passages found come back. '
    "When you know the answer, reply without a tool call, ending with 'Answer: <the answer>'."
)
PRIVILEGED_INSTRUCTION = "A reference solution (the searches to make, then the answer):\n{solution}"
ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


@dataclass
class SearchQAConfig(TaskConfig):
    questions: str | None = None  # JSONL of {question, answer | answers}
    eval_questions: str | None = None  # held-out JSONL; None = hold out task.eval_size rows of questions
    corpus: str | None = None  # JSONL of {id, title, text}, searched with BM25
    retriever_url: str | None = None  # a Search-R1 /retrieve endpoint instead of a local corpus
    retriever_api_key_env: str | None = None  # environment variable holding its key (sent only to that host)
    retriever_deadline: float = 30.0  # seconds per request to the retriever, everything included
    retriever_retries: int = 3  # further attempts after a transient failure, with exponential backoff
    # when the retriever, having answered, stops answering: wait up to retriever_outage_seconds (the step paused), or
    # stop with a checkpoint at the step boundary, resumably (docs/cluster.md)
    retriever_outage: Literal["wait", "stop"] = "wait"
    retriever_outage_seconds: float = 600.0
    question_field: str = "question"
    answer_field: str = "answer"  # a string, or a list of accepted answers
    group_field: str | None = None  # a row field (e.g. hops, or HotpotQA's type): held-out exact match per value too
    top_k: int = 3  # passages per search
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 512  # completion tokens per episode, the model's and the search results'
    system_prompt: str | None = SYSTEM_PROMPT
    # OPSD's privileged teacher sees the question followed by this ({solution}: the row's scripted turns, or its answers)
    privileged_instruction: str = PRIVILEGED_INSTRUCTION
    has_step_judge: ClassVar[bool] = True  # OVD's programmatic judge: each turn against the row's scripted turns

    def validate(self, cfg: Any) -> None:
        require(self.questions is not None, "task.questions", "is required for task.name=search_qa (a JSONL of questions and answers)")
        require((self.corpus is None) != (self.retriever_url is None), "task.corpus", "or task.retriever_url: give exactly one")
        require(self.top_k >= 1, "task.top_k", f"must be >= 1, got {self.top_k}")
        require(self.max_turns >= 1, "task.max_turns", f"must be >= 1, got {self.max_turns}")
        require(
            self.max_tokens >= cfg.sampling.max_new_tokens, "task.max_tokens",
            f"must be at least sampling.max_new_tokens ({cfg.sampling.max_new_tokens}), got {self.max_tokens}",
        )
        require("{solution}" in self.privileged_instruction, "task.privileged_instruction", "must contain {solution}")
        require(self.retriever_deadline > 0, "task.retriever_deadline", f"must be > 0 seconds, got {self.retriever_deadline}")
        require(self.retriever_retries >= 0, "task.retriever_retries", f"must be >= 0, got {self.retriever_retries}")
        validate_outage(self.retriever_outage, self.retriever_outage_seconds, "task.retriever_", cfg.train.dist_timeout)
        if self.retriever_api_key_env:
            require(bool(os.environ.get(self.retriever_api_key_env)), "task.retriever_api_key_env", f"names {self.retriever_api_key_env}, which is not set")

    def completion_budget(self, max_new_tokens: int) -> int:
        return self.max_tokens  # an episode's agent and observation tokens

    def unsupported(self, needs) -> str | None:
        # reference solutions: the rows' scripted turns; the judge: ScriptJudge, or a model / HTTP one on the episode
        # text; the privileged view: the question with the row's script or answers (privileged_messages)
        return episodes_lack(replace(needs, solutions=False, judge=False, privileged=False), "task.name=search_qa")


def read_corpus(path: Path | str) -> list[Passage]:
    """The passages of a corpus (JSONL, or any file ``tasks.rows.read_rows`` reads); a ``DataError`` names the file,
    row and field of a bad row."""
    passages, seen = [], set()
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: not a JSON object")
        for name in ("id", "text"):
            if not isinstance(row.get(name), (str, int)) or str(row[name]).strip() == "":
                raise DataError(f"{where}: field '{name}' is missing or empty")
        title = row.get("title", "")
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be a string")
        passage_id = str(row["id"])
        if passage_id in seen:
            raise DataError(f"{where}: id '{passage_id}' appears twice")
        seen.add(passage_id)
        passages.append(Passage(passage_id, title, str(row["text"])))
    if not passages:
        raise DataError(f"corpus file '{path}' holds no passages")
    return passages


def normalise(text: str) -> str:
    """SQuAD answer normalisation: lower case, punctuation and the articles a / an / the removed, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 of two normalised strings: the harmonic mean of the precision and recall of their shared words."""
    predicted, wanted = prediction.split(), gold.split()
    common = sum(min(predicted.count(w), wanted.count(w)) for w in set(predicted))
    if not common:
        return float(predicted == wanted)
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def final_answer(reply: str) -> str:
    """The text after the last ``Answer:`` of a reply, or the whole reply."""
    last = None
    for last in ANSWER.finditer(reply):
        pass
    after = reply[last.end() :].strip() if last else ""
    return after.splitlines()[0] if after else reply


def read_questions(path: str, question_field: str, answer_field: str, group_field: str | None = None) -> list[Example]:
    """Questions and their accepted answers (JSONL, JSON, Parquet or a saved dataset); a bad row names where it is.
    With ``group_field``, each example's ``meta["group"]`` is ``(group_field, str(row[group_field]))``."""
    examples = []
    for where, row in read_rows(path):
        question = row.get(question_field) if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field '{question_field}' is missing or empty")
        answers = row.get(answer_field, row.get("answers"))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: field '{answer_field}' must be a non-empty string or list of strings")
        turns = row.get("turns")
        if turns is not None and (not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns)):
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings (the scripted assistant turns)")
        solution = "\n".join(turns) if turns else None  # what the pre-flight pass sees; SFT plays the turns themselves
        meta = {"source": where, "answers": answers, "turns": turns}
        if group_field is not None:
            if row.get(group_field) is None:
                raise DataError(f"{where}: field '{group_field}' (task.group_field) is missing")
            meta["group"] = (group_field, str(row[group_field]))
        examples.append(Example(question, answers[0], solution, meta=meta))
    if not examples:
        raise DataError(f"questions file '{path}' holds no rows")
    return examples


@register_task("search_qa", SearchQAConfig)
class SearchQATask(RewardsOneByOne, FixedSplits, EpisodicTask):
    name = "search_qa"

    def __init__(self, config: SearchQAConfig, seed: int = 0):
        c = self.config = config
        read = lambda path: read_questions(world_file(path), c.question_field, c.answer_field, c.group_field)  # noqa: E731
        self.load_splits(read, c.questions, c.eval_questions, c.eval_size, seed)
        if c.corpus:
            self.searcher = BM25Index(read_corpus(world_file(c.corpus)))
        else:
            key = os.environ.get(c.retriever_api_key_env) if c.retriever_api_key_env else None
            outage = OutagePolicy("task.retriever_url", "task.retriever_", c.retriever_outage, c.retriever_outage_seconds)
            self.searcher = HTTPRetriever(c.retriever_url, key, c.retriever_deadline, c.retriever_retries, outage=outage)
        self.tools = [SearchTool(self.searcher, c.top_k)]

    @classmethod
    def from_config(cls, config: SearchQAConfig, seed: int = 0) -> "SearchQATask":
        return cls(config, seed)

    def environment(self, example: Example) -> ToolEnvironment:
        return ToolEnvironment(self, example, self.tools)

    def episode_limits(self) -> EpisodeLimits:
        return EpisodeLimits(max_turns=self.config.max_turns, max_tokens=self.config.max_tokens)

    def reward(self, completion: str, example: Example) -> float:
        """Exact match of the reply's final answer against any gold answer."""
        answer = normalise(final_answer(completion))
        return float(any(answer == normalise(gold) for gold in example.meta.get("answers", [example.answer])))

    def f1(self, completion: str, example: Example) -> float:
        """Token F1 of the reply's final answer against the best gold answer (SQuAD normalisation)."""
        return max(token_f1(normalise(final_answer(completion)), normalise(gold)) for gold in example.meta.get("answers", [example.answer]))

    def eval_metrics(self, example: Example, completion: str, reward: float) -> dict[str, float]:
        """Token F1 of the final answer, as web QA reports beside exact match; with ``task.group_field``, the exact match
        within the example's group too (``accuracy_<field>_<value>``)."""
        metrics = {"f1": self.f1(completion, example)}
        if example.meta.get("group"):
            metrics["accuracy_{}_{}".format(*example.meta["group"])] = reward
        return metrics

    def messages(self, example: Example) -> list[dict]:
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return system + [{"role": "user", "content": example.prompt}]

    def privileged_messages(self, example: Example) -> list[dict]:
        """OPSD's privileged view: the question followed by what the row knows — its scripted turns when it has them
        (the searches and the answer), else its accepted answers — filled into ``task.privileged_instruction``."""
        script = example.meta.get("turns")
        known = "\n".join(script) if script else "Answer: " + " / ".join(example.meta.get("answers", [example.answer]))
        messages = self.messages(example)
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + "\n\n" + self.config.privileged_instruction.replace("{solution}", known)}
        return messages

    def step_judge(self) -> "ScriptJudge":
        return ScriptJudge(self)


class ScriptJudge:
    """OVD's programmatic judge for search episodes whose rows carry scripted ``turns`` (the embedded search world's
    do): an agent turn scores 9 when it does what the script's turn does — the same tool calls (name and arguments),
    or an answer that matches exactly — and 0 otherwise, a turn beyond the script 0 too; an episode scores the
    lowest of its turns (9 only when every turn is right)."""

    def __init__(self, task: SearchQATask):
        self.task = task

    def turn_scores(self, example: Example, turns: list[str]) -> list[float]:
        script = example.meta.get("turns")
        if not script:
            raise DataError(f"{example.meta.get('source', 'a row')}: no scripted 'turns', which the programmatic judge (method.ovd.judge=programmatic) compares against")
        scores = []
        for k, turn in enumerate(turns):
            wanted = script[k] if k < len(script) else None
            if wanted is None:
                scores.append(0.0)
            elif CLOSE in wanted:
                scores.append(9.0 if parse_tool_calls(turn).calls == parse_tool_calls(wanted).calls else 0.0)
            else:
                scores.append(9.0 * self.task.reward(turn, example))
        return scores

    def episode_score(self, example: Example, turns: list[str]) -> float:
        scores = self.turn_scores(example, turns)
        return min(scores) if scores else 0.0
