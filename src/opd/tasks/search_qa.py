"""Question answering with a search tool, over several turns: the users'-data task for tool-using agents.

``task.name=search_qa``: questions JSONL (``question``, and ``answer`` or a list ``answers``), searched
in a corpus JSONL (``id``, ``title``, ``text``; BM25 over SQLite FTS5) or through a Search-R1
``/retrieve`` server (``task.retriever_url``). Each example is an episode (``environment``): the
model may call ``search`` in the Hermes / Qwen ``<tool_call>`` format for up to ``task.max_turns``
turns, and its first turn without a call is its answer. The reward is exact match (SQuAD
normalisation: lower case, no punctuation, no articles, single spaces) of the text after the last
``Answer:`` (the whole turn if there is none) against any gold answer.
"""

from __future__ import annotations

import logging
import os
import re
import string
from dataclasses import dataclass
from typing import Any

from ..episodes import EpisodeLimits, ToolEnvironment
from ..search import BM25Index, HTTPRetriever
from ..sections import require
from ..tool_calls import SearchTool
from .base import Example, TaskConfig, episodes_lack, register_task
from .rows import DataError, read_rows
from .splits import FixedSplits

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "Answer the question. You may search a knowledge base first: write "
    '<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call> and the passages found come back. '
    "When you know the answer, reply without a tool call, ending with 'Answer: <the answer>'."
)
ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


@dataclass
class SearchQAConfig(TaskConfig):
    questions: str | None = None  # JSONL of {question, answer | answers}
    eval_questions: str | None = None  # held-out JSONL; None = hold out task.eval_size rows of questions
    corpus: str | None = None  # JSONL of {id, title, text}, searched with BM25
    retriever_url: str | None = None  # a Search-R1 /retrieve endpoint instead of a local corpus
    retriever_api_key_env: str | None = None  # environment variable holding its key (sent only to that host)
    question_field: str = "question"
    answer_field: str = "answer"  # a string, or a list of accepted answers
    top_k: int = 3  # passages per search
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 512  # completion tokens per episode, the model's and the search results'
    system_prompt: str | None = SYSTEM_PROMPT

    def validate(self, cfg: Any) -> None:
        require(self.questions is not None, "task.questions", "is required for task.name=search_qa (a JSONL of questions and answers)")
        require((self.corpus is None) != (self.retriever_url is None), "task.corpus", "or task.retriever_url: give exactly one")
        require(self.top_k >= 1, "task.top_k", f"must be >= 1, got {self.top_k}")
        require(self.max_turns >= 1, "task.max_turns", f"must be >= 1, got {self.max_turns}")
        require(
            self.max_tokens >= cfg.sampling.max_new_tokens, "task.max_tokens",
            f"must be at least sampling.max_new_tokens ({cfg.sampling.max_new_tokens}), got {self.max_tokens}",
        )
        require(cfg.sampling.engine == "hf", "sampling.engine", "must be hf for task.name=search_qa (turns end at stop strings, which the vLLM engine does not take yet)")
        if self.retriever_api_key_env:
            require(bool(os.environ.get(self.retriever_api_key_env)), "task.retriever_api_key_env", f"names {self.retriever_api_key_env}, which is not set")

    def unsupported(self, needs) -> str | None:
        return episodes_lack(needs, "task.name=search_qa")


def normalise(text: str) -> str:
    """SQuAD answer normalisation: lower case, punctuation and the articles a / an / the removed, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def final_answer(reply: str) -> str:
    """The text after the last ``Answer:`` of a reply, or the whole reply."""
    last = None
    for last in ANSWER.finditer(reply):
        pass
    after = reply[last.end() :].strip() if last else ""
    return after.splitlines()[0] if after else reply


def read_questions(path: str, question_field: str, answer_field: str) -> list[Example]:
    """Questions and their accepted answers (JSONL, JSON, Parquet or a saved dataset); a bad row names where it is."""
    examples = []
    for where, row in read_rows(path):
        question = row.get(question_field) if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field '{question_field}' is missing or empty")
        answers = row.get(answer_field, row.get("answers"))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: field '{answer_field}' must be a non-empty string or list of strings")
        examples.append(Example(question, answers[0], meta={"source": where, "answers": answers}))
    if not examples:
        raise DataError(f"questions file '{path}' holds no rows")
    return examples


@register_task("search_qa", SearchQAConfig)
class SearchQATask(FixedSplits):
    name = "search_qa"

    def __init__(self, config: SearchQAConfig, seed: int = 0):
        c = self.config = config
        self.load_splits(lambda path: read_questions(path, c.question_field, c.answer_field), c.questions, c.eval_questions, c.eval_size, seed)
        if c.corpus:
            self.searcher = BM25Index.from_jsonl(c.corpus)
        else:
            key = os.environ.get(c.retriever_api_key_env) if c.retriever_api_key_env else None
            self.searcher = HTTPRetriever(c.retriever_url, key)
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

    def messages(self, example: Example) -> list[dict]:
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return system + [{"role": "user", "content": example.prompt}]

    def privileged_messages(self, example: Example) -> list[dict]:
        raise DataError("task.name=search_qa has no privileged view yet")

    def step_judge(self) -> None:
        return None
