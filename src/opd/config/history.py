"""How the configs of earlier runs are read, and which part of a config decides a run's trajectory.

A run saves its resolved config (``<run>/config.yaml``). Keys renamed since are moved to their new
spelling (with their value converted to the new unit), and keys added since are given the value
that meant what the run did before they existed, so that a resume, ``opd inspect`` and ``opd compare``
read an old run as the run it was. A key given under its old name in a user's own config is an
error naming the new one (``config.loading``).

``trajectory_view`` leaves out the subsections of the methods and engines a run does not use
(``method.<other>.*``, ``sampling.<other engine>.*``): they cannot change what the run computes.
This module imports nothing of opd.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

# old dotted key -> (new dotted key, the unit note an error gives, value converter)
RENAMED_KEYS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "method.ovd.http.timeout": ("method.ovd.http.deadline", "", lambda seconds: seconds),
    "method.ovd.http.max_reply_bytes": (
        "method.ovd.http.max_reply_mb", " (in MiB: 1048576 bytes = 1.0)", lambda size: None if size is None else size / (1 << 20),
    ),
}

# dotted key -> the value that means what runs saved before the key existed did
ADDED_KEYS: dict[str, Any] = {
    "method.ovd.baseline": "final_group",  # OVD measured against the final group until 2026-12-03
}


def _pop(tree: dict, key: str):
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    return (True, node.pop(leaf)) if leaf in node else (False, None)


def _place(tree: dict, key: str, value, overwrite: bool) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            return  # a section the saved run did not have: nothing to fill
        node = child
    if overwrite or leaf not in node:
        node[leaf] = value


def migrate_saved(tree: dict) -> dict:
    """A saved config tree with renamed keys under their new names (values converted) and added keys filled with
    their value from before they existed; the input is not changed."""
    tree = copy.deepcopy(tree)
    for old, (new, _, convert) in RENAMED_KEYS.items():
        found, value = _pop(tree, old)
        if found:
            _place(tree, new, convert(value), overwrite=True)
    for key, value in ADDED_KEYS.items():
        _place(tree, key, value, overwrite=False)
    return tree


def trajectory_view(tree: dict) -> dict:
    """The config tree without the subsections of the methods and engines it does not use."""
    tree = copy.deepcopy(tree)
    for section, picker in (("method", "name"), ("sampling", "engine")):
        node = tree.get(section)
        if isinstance(node, dict):
            for key in [k for k, v in node.items() if isinstance(v, dict) and k != node.get(picker)]:
                del node[key]
    return tree
