"""One failing rank ends them all: a rank whose run raises says so in the launcher's key-value store, and a watchdog
thread on every other rank, polling that store, ends its process within ``POLL_S`` or so instead of letting it wait
in a collective for the process group's timeout (``train.dist_timeout``; minutes on NCCL) — docs/cluster.md.

The store is the one the ranks met through (``MASTER_ADDR:MASTER_PORT``: torchrun's agent, or rank 0 under a plain
``env://`` launch), reached by a connection of the watchdog's own. Only the failing rank prints its error (it names
its rank); the others exit with ``PEER_FAILED_EXIT``, rank 0 with one line saying which rank failed. A rank whose
collective fails because the failing rank left (gloo notices a closed connection) raises ``PeerFailed`` instead of
its own error. A store that stops answering (its host, rank 0 under ``env://``, died) counts as a failure too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import timedelta

log = logging.getLogger(__name__)

POLL_S = 1.0
PEER_FAILED_EXIT = 1
FAILED_KEY = "opd/failed"


def failure_key() -> str:
    """The key of this launch attempt (torchrun restarts a failed group under the same store)."""
    return f"{FAILED_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def connect_store(timeout_s: float = 30.0):
    """A client of the launcher's store, or None where there is none to reach (one process, no rendezvous address)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    from torch.distributed import TCPStore

    try:
        return TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as err:  # noqa: BLE001 - without a store the run keeps the process group's own timeout
        log.warning("no failure watchdog: cannot reach the launcher's store at %s:%s (%s)", host, port, err)
        return None


class PeerFailed(RuntimeError):
    """Another rank failed (its error is printed by that rank); this one stops too."""


def stopped_because(why: str) -> str:
    """The line rank 0 prints when another rank's failure stops it."""
    if why.startswith("rank "):  # an announced failure: "rank N: Error: message", printed by that rank
        return f"stopped because {why.split(':', 1)[0]} failed (its error is above)"
    return f"stopped: {why}"


class Watchdog:
    """Ends this process when another rank has announced a failure. ``announce`` is what a failing rank calls."""

    def __init__(self, rank: int, store, poll_s: float = POLL_S):
        self.rank, self.store, self.poll_s = rank, store, poll_s
        self.key = failure_key()
        self.failing = False  # this rank is failing itself: it will say why and exit on its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="opd-failure-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (a finished run, before leaving the process group: its store may go away then)."""
        self._stop.set()
        self._thread.join(timeout=self.poll_s * 5)

    def announce(self, err: BaseException) -> None:
        """Tell the other ranks that this one fails with ``err`` (first failure wins; never raises)."""
        self.failing = True
        self._stop.set()
        try:
            self.store.compare_set(self.key, "", f"rank {self.rank}: {type(err).__name__}: {err}"[:2000])
        except Exception as store_err:  # noqa: BLE001 - the run fails anyway; the others then keep their timeout
            log.warning("could not tell the other ranks of this failure: %s", store_err)

    def peer_failure(self) -> str | None:
        """What another rank announced, if one has."""
        try:
            if self.store.check([self.key]):
                return self.store.get(self.key).decode(errors="replace")
        except Exception as err:  # noqa: BLE001 - the store's host is gone: so is the run
            return f"the launcher's store stopped answering ({type(err).__name__}), so another rank has stopped"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            why = self.peer_failure()
            if why is None:
                continue
            if self._stop.is_set() or self.failing:
                return
            if self.rank == 0:
                print(f"opd: {stopped_because(why)}", file=sys.stderr, flush=True)
            os._exit(PEER_FAILED_EXIT)
