"""Tool calls in an assistant turn, in the Hermes / Qwen format, and the tools an episode may call.

A call is a JSON object between tags::

    <tool_call>
    {"name": "search", "arguments": {"query": "..."}}
    </tool_call>

``parse_tool_calls`` returns the well-formed calls of a turn and, for every malformed one, a problem in
words (bad JSON, no name, arguments that are not an object, an unclosed tag). The episode does not stop
at a malformed call: the problem goes back to the model as the tool's answer, and is counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..services.http import ServiceError
from .search import Searcher, format_passages

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedTurn:
    calls: list[ToolCall]
    problems: list[str]  # one line per malformed call


def parse_tool_calls(text: str) -> ParsedTurn:
    """The tool calls in an assistant turn's text, and what is wrong with each malformed one."""
    calls, problems = [], []
    for match in CALL.finditer(text):
        body = match.group(1).strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            problems.append(f"the tool call is not valid JSON ({err.msg} at character {err.pos}): {body[:80]!r}")
            continue
        if not isinstance(call, dict):
            problems.append(f"the tool call must be a JSON object with 'name' and 'arguments', got {type(call).__name__}")
            continue
        name, arguments = call.get("name"), call.get("arguments", {})
        if isinstance(arguments, str):  # some templates serialise the arguments a second time
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(name, str) or not name:
            problems.append("the tool call has no 'name'")
        elif not isinstance(arguments, dict):
            problems.append(f"the arguments of '{name}' must be a JSON object, got {type(arguments).__name__}")
        else:
            calls.append(ToolCall(name, arguments))
    tail = text[text.rfind(CLOSE) + len(CLOSE) :] if CLOSE in text else text
    if OPEN in tail:
        problems.append(f"a {OPEN} is never closed with {CLOSE}")
    return ParsedTurn(calls, problems)


class Tool(Protocol):
    """A tool an environment offers: its name, its JSON schema (what the chat template's ``tools=`` shows the
    model) and a call that returns the observation text (raising ``ValueError`` for bad arguments)."""

    name: str

    def schema(self) -> dict: ...

    def __call__(self, arguments: dict[str, Any]) -> str: ...


def run_call(tools: dict[str, Tool], call: ToolCall) -> tuple[str, bool]:
    """``(observation, ok)`` for one parsed call: the tool's answer, or what was wrong with the call."""
    tool = tools.get(call.name)
    if tool is None:
        return f"error: there is no tool '{call.name}' (available: {', '.join(sorted(tools))})", False
    try:
        return tool(call.arguments), True
    except ServiceError as err:
        if err.unavailable:  # no answer at all: the run stops (or waits) for the service, the model is not told
            raise
        return f"error: {call.name}: {err}", False  # a refused request: the model is told, as for bad arguments
    except ValueError as err:
        return f"error: {call.name}: {err}", False


class SearchTool:
    """``search(query)``: the ``k`` best passages of a ``Searcher`` (BM25 index or HTTP retriever) as text."""

    name = "search"

    def __init__(self, searcher: Searcher, k: int = 3):
        self.searcher, self.k = searcher, k

    def schema(self) -> dict:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": f"Search the knowledge base; returns the {self.k} most relevant passages.",
                "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}}, "required": ["query"]},
            },
        }

    def __call__(self, arguments: dict[str, Any]) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("needs a non-empty string 'query'")
        return format_passages(self.searcher.search(query, self.k))
