"""The local Hugging Face cache: what a Hub repo id (``org/name``) names on this machine, never downloading.
``student.path`` / ``teacher.path`` (models) and ``task.path`` (datasets) accept such ids."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub names repositories


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name))


def cached_snapshot(repo_id: str, repo_type: str = "model") -> str | None:
    """The directory of the local cache's snapshot of ``repo_id`` (its ``main`` revision), or None when the cache
    holds none. Reads ``HF_HUB_CACHE`` / ``HF_HOME`` as huggingface_hub does."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def cache_location() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
