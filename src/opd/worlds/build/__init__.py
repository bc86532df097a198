"""Building the embedded worlds with opd's own SFT (``opd world build``), and checking a rebuild (``opd world verify``).

``build(world, directory)`` and ``verify(world, reference)`` take a world's name (``worlds.locate.WORLDS``); each
world's own builder is ``arithmetic.build_world`` / ``search.build_search_world``.
"""

from __future__ import annotations

from pathlib import Path


def build(world: str, directory: Path, reuse: Path | None = None) -> Path:
    """Build ``world`` into ``directory`` (copying from ``reuse`` the roles whose build inputs are unchanged there)."""
    if world == "search":
        from .search import build_search_world

        return build_search_world(directory, reuse=reuse)
    from .arithmetic import build_world

    return build_world(directory, reuse=reuse)


def verify(world: str, reference: Path) -> list[str]:
    """Rebuild ``world`` in a temporary directory; the files that differ from ``reference``."""
    if world == "search":
        from .search import verify_search_world

        return verify_search_world(reference)
    from .arithmetic import verify_world

    return verify_world(reference)
