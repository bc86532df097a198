"""Building the embedded worlds with opd's own SFT (``opd world build``), and checking a rebuild (``opd world verify``).

``build(world, directory)`` and ``verify(world, reference)`` take a world's name (``worlds.locate.WORLDS``) and call
its own builder: ``arithmetic.build_world`` / ``search.build_search_world`` / ``code.build_code_world``.
"""

from __future__ import annotations

from pathlib import Path

from .arithmetic import build_world, verify_world
from .code import build_code_world, verify_code_world
from .search import build_search_world, verify_search_world

BUILDERS = {
    "arithmetic": (build_world, verify_world), "search": (build_search_world, verify_search_world),
    "code": (build_code_world, verify_code_world),
}


def build(world: str, directory: Path, reuse: Path | None = None) -> Path:
    """Build ``world`` into ``directory`` (copying from ``reuse`` the roles whose build inputs are unchanged there)."""
    return BUILDERS[world][0](directory, reuse=reuse)


def verify(world: str, reference: Path) -> list[str]:
    """Rebuild ``world`` in a temporary directory; the files that differ from ``reference``."""
    return BUILDERS[world][1](reference)
