"""Users' data files read into Examples: the file types (JSONL, JSON, Parquet, ``datasets``) and the row shapes.

Row shapes (``task.format: auto`` picks one per row from its keys, in this order):

- ``messages``: a conversation, a list of ``{"role", "content"}``; a final assistant turn, if present, is
  the reference solution, and the turns before it are the prompt (TRL's / ``datasets``' conversational format);
- ``prompt``: a string, or a list of messages (TRL's conversational prompt), with an optional ``completion``
  (string or messages: the reference solution);
- ``problem``: a problem string with an optional ``solution``.

Any shape may carry an ``answer`` (string or number), what the grader checks. Field names are configurable.
Every error names the file and row (``path:line`` for JSONL, ``path[index]`` otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..services.hub import cache_location, cached_snapshot, looks_like_hub_id
from ..worlds.locate import world_part
from .base import Example

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data file or row; the message names the file, row and field."""


def world_file(path: str) -> str:
    """A data path, with ``world:search/NAME`` or ``world:code/NAME`` meaning a file of an embedded world."""
    try:
        found = world_part(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    return path if found is None else str(found)


@dataclass(frozen=True)
class Fields:
    """Which column holds what (``task.*_field``) and which shape to expect (``task.format``)."""

    format: str = "auto"  # auto | messages | prompt | problem
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    problem: str = "problem"
    solution: str | None = "solution"
    answer: str = "answer"
    teacher: str | None = None  # the column naming each row's teacher route
    answer_from_solution: bool = True  # a row without an answer takes its solution's last \boxed{} (task.answer_from_solution)


# ----------------------------------------------------------------------------- files


def read_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of a JSONL / JSON / Parquet file or a ``datasets.save_to_disk`` directory.

    ``split`` picks a DatasetDict's split (and is an error for anything that has no splits).
    """
    hub = hub_dataset(path)
    if hub is not None:
        yield from _hub_rows(str(path), hub, split)
        return
    path = Path(path)
    if path.is_dir():
        yield from _dataset_rows(path, split)
        return
    if not path.is_file():
        if looks_like_hub_id(str(path)):
            raise DataError(
                f"{path}: no such file, and the Hugging Face cache ({cache_location()}) holds no dataset of that name; opd never "
                f"downloads: fetch it beforehand (huggingface-cli download --repo-type dataset {path}), or save it with "
                "datasets' save_to_disk and give that directory"
            )
        raise DataError(f"{path}: no such file")
    if split is not None:
        raise DataError(f"{path}: a split ('{split}') was asked for, but only a saved DatasetDict directory has splits")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    else:  # .jsonl, .ndjson, or anything else read as JSON lines
        yield from _jsonl_rows(path)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as err:
        if "Extra data" in err.msg:  # JSON lines under a .json name
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict) and _is_one_row(data):
        data = [data]
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list it holds
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding exactly one list), got keys {sorted(data)}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _is_one_row(data: dict) -> bool:
    """An object that is itself a row (it has string fields, or its list is a conversation) rather than a container."""
    lists = [v for v in data.values() if isinstance(v, list)]
    conversation = bool(lists) and all(isinstance(m, dict) and "role" in m for m in lists[0])
    return conversation or any(isinstance(v, str) for v in data.values())


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:120]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[{i}]", row


def hub_dataset(path: str | Path) -> str | None:
    """The local Hugging Face cache's snapshot of a dataset named by its Hub id (``org/name``, not a local path)."""
    text = str(path)
    if Path(text).exists() or not looks_like_hub_id(text):
        return None
    return cached_snapshot(text, repo_type="dataset")


def _hub_splits(snapshot: str):
    """A cached Hub dataset's files, read by datasets itself (its split names from the file names), offline."""
    import datasets

    try:
        return datasets.load_dataset(snapshot)
    except Exception as err:  # noqa: BLE001 - datasets raises several types for files it cannot read
        raise DataError(f"{snapshot}: the cached dataset cannot be read ({' '.join(str(err).split())[:160]})") from None


def _hub_rows(name: str, snapshot: str, split: str | None) -> Iterator[tuple[str, Any]]:
    data = _hub_splits(snapshot)
    split = split or "train"
    if split not in data:
        raise DataError(f"{name}: the cached dataset has no split '{split}' (it has: {', '.join(data)}; set task.split / task.eval_split)")
    for i, row in enumerate(data[split]):
        yield f"{name}[{split}][{i}]", row


def dataset_splits(path: str | Path) -> list[str] | None:
    """The splits of a saved DatasetDict directory, or of a cached Hub dataset; None for anything else."""
    hub = hub_dataset(path)
    if hub is not None:
        return list(_hub_splits(hub))
    path = Path(path)
    marker = path / "dataset_dict.json"
    if path.is_dir() and marker.is_file():
        return list(json.loads(marker.read_text()).get("splits", []))
    return None


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: a directory that is not a dataset saved by datasets.save_to_disk ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise DataError(f"{path}: the DatasetDict has no split '{split}' (it has: {', '.join(data)}; set task.split / task.eval_split)")
        data, where = data[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: a split ('{split}') was asked for, but this is a single Dataset without splits")
    else:
        where = str(path)
    for i, row in enumerate(data):
        yield f"{where}[{i}]", row


# ----------------------------------------------------------------------------- rows


def row_shape(row: dict, fields: Fields) -> str:
    """The shape of one row: ``fields.format``, or under ``auto`` the first of messages / prompt / problem it has."""
    if fields.format != "auto":
        return fields.format
    for shape, key in (("messages", fields.messages), ("prompt", fields.prompt), ("problem", fields.problem)):
        if row.get(key) is not None:
            return shape
    return "none"


def final_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None when there is none."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # the last box is unclosed (a cut-off answer): an earlier one is not the final answer


def row_to_example(where: str, row: Any, fields: Fields) -> Example:
    """One row as an Example; ``meta`` keeps where it came from and its shape."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
    shape = row_shape(row, fields)
    if shape == "messages":
        messages = _messages(row.get(fields.messages), where, fields.messages)
        prompt, solution = _split_final_assistant(messages)
    elif shape == "prompt":
        value = row.get(fields.prompt)
        prompt = _messages(value, where, fields.prompt) if isinstance(value, list) else [_user(value, where, fields.prompt)]
        solution = _completion(row.get(fields.completion), where, fields.completion)
    elif shape == "problem":
        prompt = [_user(row.get(fields.problem), where, fields.problem)]
        solution = _string(row.get(fields.solution), where, fields.solution) if fields.solution else None
    else:
        raise DataError(
            f"{where}: no prompt: expected a '{fields.messages}', '{fields.prompt}' or '{fields.problem}' field "
            f"(row has: {', '.join(sorted(row)) or 'no fields'}; task.format / task.*_field name others)"
        )
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: field '{fields.messages if shape == 'messages' else fields.prompt}' has no user turn before the reply")
    answer = row.get(fields.answer)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _string(answer, where, fields.answer)
    meta = {"source": where, "shape": shape, "row": row}  # the row itself: what a user's reward function reads
    if answer is None and solution is not None and fields.answer_from_solution:
        answer = final_boxed(solution)  # a conversation's worked answer: what its final assistant turn boxed
        if answer is not None:
            meta["answer_from_solution"] = True
    if fields.teacher:
        route = row.get(fields.teacher)
        if not isinstance(route, str) or not route.strip():
            raise DataError(f"{where}: field '{fields.teacher}' (the teacher route) is missing or not a string")
        meta["teacher"] = route
    last_user = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return Example(prompt=last_user, answer=answer, solution=solution, meta=meta, messages=tuple(prompt))


def _string(value: Any, where: str, name: str) -> str | None:
    """An optional string field: None when absent or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value if value.strip() else None


def _user(value: Any, where: str, name: str) -> dict:
    text = _string(value, where, name)
    if text is None:
        raise DataError(f"{where}: field '{name}' is missing or empty")
    return {"role": "user", "content": text}


def _messages(value: Any, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {name}[{i}] has role '{m['role']}' (expected one of {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_final_assistant(messages: list[dict]) -> tuple[list[dict], str | None]:
    if messages[-1]["role"] == "assistant":
        return messages[:-1], (messages[-1]["content"] if messages[-1]["content"].strip() else None)
    return messages, None


def _completion(value: Any, where: str, name: str) -> str | None:
    if isinstance(value, list):  # conversational completion: the assistant turn(s)
        turns = _messages(value, where, name)
        if any(m["role"] != "assistant" for m in turns):
            raise DataError(f"{where}: field '{name}' may hold only assistant messages")
        text = "".join(m["content"] for m in turns)
        return text if text.strip() else None
    return _string(value, where, name)


def read_examples(path: str | Path, fields: Fields, split: str | None = None) -> list[Example]:
    """Every row of ``path`` as an Example; a file without rows is an error."""
    examples = [row_to_example(where, row, fields) for where, row in read_rows(path, split)]
    if not examples:
        raise DataError(f"{path}{f'[{split}]' if split else ''}: contains no rows")
    return examples

