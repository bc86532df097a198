"""Writing a run's configuration (``<run>/config.yaml``) with its secrets redacted: values of secret-looking keys
and credentials inside URLs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

SECRET_WORDS = ("key", "token", "secret", "password")


def secret_looking(name: str) -> bool:
    """Whether a key's name looks like it holds a secret (``api_key``, ``hf_token``); a tokenizer is not a token."""
    name = name.lower().replace("tokenizer", "")
    return any(w in name for w in SECRET_WORDS)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def redact_url(text: str) -> str:
    """A URL with its user:password and secret-looking query values replaced; any other text unchanged."""
    parts = urlsplit(text)
    if not (parts.scheme and parts.netloc):
        return text
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=<redacted>" if secret_looking(k) else f"{k}={v}" if v or "=" in pair else k
        for pair in parts.query.split("&") if pair
        for k, _, v in [pair.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(tree: Any) -> Any:
    """Replace values of secret-looking keys (api_key, token, …) and credentials inside URLs, so saved configs hold
    no secrets."""
    if isinstance(tree, str):
        return redact_url(tree)
    if isinstance(tree, dict):
        return {
            k: ("<redacted>" if secret_looking(k) and isinstance(v, str) and v else redact(v))
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    return tree


def save_config(config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(redact(to_dict(config)), sort_keys=False))
