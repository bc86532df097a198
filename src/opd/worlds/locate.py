"""Where the embedded worlds are, and what ``world:…`` names in a config mean.

Both worlds live in the same three places, looked up in one order: ``$OPD_WORLD_DIR/<name>-<fingerprint>`` when
``OPD_WORLD_DIR`` is set; else the copy shipped inside the package (``opd/assets/…``) when it was built from the
spec asked for (its ``world.json`` holds the fingerprint); else ``~/.cache/opd/<name>-<fingerprint>``. A world
not built where it is looked for is an error that names the command that builds it.

Configs name a world's parts by prefix: ``world:teacher`` (the arithmetic world's models), ``world:search/student``
and ``world:code/student`` (the search and code worlds' models and data files). This module imports nothing of opd but the worlds' specs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .arithmetic import DEFAULT_SPEC, SHIPPED_FILES, WORLD_MODELS
from .code import CODE_WORLD_FILES, DEFAULT_CODE_SPEC
from .search import DEFAULT_SEARCH_SPEC, SEARCH_WORLD_FILES

ASSETS = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class World:
    name: str  # as ``opd world --world`` names it
    prefix: str  # how a config names one of its parts: prefix + part
    directory_name: str  # its build directory's name, before the fingerprint
    shipped: Path  # the copy inside the package
    parts: tuple[str, ...]  # what a config may name
    rebuilt: tuple[str, ...]  # the parts a rebuild must reproduce byte for byte (``opd world verify``)
    what: str  # a part, in words (for errors)
    label: str  # the world, in words
    build_command: str
    build_time: str  # how long the build takes, in words
    default_spec: object  # the spec opd runs with (a ``WorldSpec`` / ``SearchWorldSpec``)


WORLDS = {
    "arithmetic": World(
        "arithmetic", "world:", "world", ASSETS / "world", WORLD_MODELS, SHIPPED_FILES, "world model", "the embedded world",
        "opd world build", "about 6 minutes, once", DEFAULT_SPEC,
    ),
    "search": World(
        "search", "world:search/", "search-world", ASSETS / "search_world", SEARCH_WORLD_FILES, SEARCH_WORLD_FILES,
        "search-world file", "the embedded search world", "opd world build --world search", "once", DEFAULT_SEARCH_SPEC,
    ),
    "code": World(
        "code", "world:code/", "code-world", ASSETS / "code_world", CODE_WORLD_FILES, CODE_WORLD_FILES, "code-world file",
        "the embedded code world", "opd world build --world code", "once", DEFAULT_CODE_SPEC,
    ),
}


def _world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world '{name}' (choose {', '.join(WORLDS)})")
    return WORLDS[name]


def cache_dir(world: str = "arithmetic", spec=None) -> Path:
    """Where ``opd world build`` writes the world built from ``spec``: under ``$OPD_WORLD_DIR``, else ``~/.cache/opd``."""
    w = _world(world)
    root = Path(os.environ.get("OPD_WORLD_DIR") or Path.home() / ".cache" / "opd")
    return root / f"{w.directory_name}-{(spec or w.default_spec).fingerprint()}"


def shipped_dir(world: str = "arithmetic", spec=None) -> Path | None:
    """The copy shipped inside the package, when it was built from ``spec``."""
    w = _world(world)
    marker = w.shipped / "world.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == (spec or w.default_spec).fingerprint():
        return w.shipped
    return None


def world_dir(world: str = "arithmetic", spec=None) -> Path:
    """Where the world is read from: ``$OPD_WORLD_DIR`` if set, else the shipped copy, else the user cache."""
    if not os.environ.get("OPD_WORLD_DIR") and (shipped := shipped_dir(world, spec)) is not None:
        return shipped
    return cache_dir(world, spec)


def part_path(world: str, part: str, spec=None) -> Path:
    """One of a world's parts (a model directory or a data file); a part it does not have, or a world not built yet,
    is a ``ValueError`` naming the fix."""
    w = _world(world)
    if part not in w.parts:
        raise ValueError(f"unknown {w.what} '{part}' (choose {', '.join(w.prefix + p for p in w.parts)})")
    directory = world_dir(world, spec)
    if not (directory / "world.json").is_file():
        raise ValueError(f"{w.label} is not built at {directory}: run `{w.build_command}` ({w.build_time})")
    return directory / part


def world_part(path: str) -> Path | None:
    """The local path a ``world:…`` name in a config stands for (``ValueError`` when it names nothing that exists);
    None for any other path."""
    for w in sorted(WORLDS.values(), key=lambda w: -len(w.prefix)):  # the longest prefix first: world:search/ before world:
        if path.startswith(w.prefix):
            return part_path(w.name, path.removeprefix(w.prefix))
    return None
