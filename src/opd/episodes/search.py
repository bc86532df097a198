"""Search for tool-using episodes: BM25 over a local corpus, and Search-R1's ``/retrieve`` over HTTP.

``BM25Index`` ranks passages (a corpus: one ``{"id", "title", "text"}`` object per row, read by the
task that searches it, ``tasks.search_qa.read_corpus``) with
SQLite's FTS5 full-text index and its ``bm25()`` ranking (Okapi BM25, k1 = 1.2, b = 0.75; the title and
the text are both searched, the title weighted ``title_weight`` times). SQLite ships with Python, so a
local search tool needs no extra package; ``benchmarks/bench_search.py`` compares it with ``bm25s``.
A query is split into words and any one of them may match (``OR``), so a user's question can be
passed as it is, quotes and operators included.

``HTTPRetriever`` speaks the ``/retrieve`` API of Search-R1's retrieval server, the usual front of a
dense index (``POST {"queries": [...], "topk": k, "return_scores": true}`` →
``{"result": [[{"document": {...}, "score": s}, ...], ...]}``), through opd's ``JSONClient``: a
total deadline per request, bounded retries, a capped reply, the key only to the configured host.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from ..services.http import JSONClient, OutagePolicy, ServiceError

WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0


class Searcher(Protocol):
    def search(self, query: str, k: int) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first (fewer when fewer match)."""
        ...


def match_expression(query: str) -> str | None:
    """An FTS5 query matching any word of ``query`` (each quoted, so nothing in it acts as an operator)."""
    words = WORD.findall(query.lower())
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words)) or None


class BM25Index:
    """BM25 over passages with SQLite FTS5, in memory or in a file (``path``). A file index is reused while it
    holds the same passages (a fingerprint of them is stored beside it) and rebuilt when they change."""

    def __init__(self, passages: Iterable[Passage], title_weight: float = 2.0, path: Path | str | None = None):
        self.title_weight = title_weight
        self._lock = threading.Lock()  # one connection, shared by the tool threads of an episode batch
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        passages = list(passages)
        digest = hashlib.sha256()
        for p in passages:
            digest.update(json.dumps([p.id, p.title, p.text]).encode())
        fingerprint = digest.hexdigest()
        with self._db:
            self._db.execute("create table if not exists fingerprint (value text)")
            stored = self._db.execute("select value from fingerprint").fetchone()
            if stored is None or stored[0] != fingerprint:
                self._db.execute("drop table if exists passages")
                self._db.execute("create virtual table passages using fts5(pid unindexed, title, text, tokenize='unicode61')")
                self._db.executemany("insert into passages(pid, title, text) values (?, ?, ?)", ((p.id, p.title, p.text) for p in passages))
                self._db.execute("delete from fingerprint")
                self._db.execute("insert into fingerprint values (?)", (fingerprint,))
        self.size = self._db.execute("select count(*) from passages").fetchone()[0]

    def search(self, query: str, k: int) -> list[Passage]:
        expression = match_expression(query)
        if expression is None or k < 1:
            return []
        with self._lock:
            rows = self._db.execute(
                "select pid, title, text, bm25(passages, 0.0, ?, 1.0) as rank from passages where passages match ? "
                "order by rank limit ?",
                (self.title_weight, expression, k),
            ).fetchall()
        return [Passage(pid, title, text, -rank) for pid, title, text, rank in rows]  # FTS5's bm25() is negated

    def close(self) -> None:
        self._db.close()


class HTTPRetriever:
    """Search-R1's ``/retrieve`` endpoint (e.g. a dense index behind its retrieval server)."""

    def __init__(
        self, url: str, api_key: str | None = None, deadline: float = 30.0, retries: int = 3, max_reply_bytes: int = 4 << 20,
        outage: OutagePolicy | None = None,
    ):
        self.client = JSONClient(url, api_key, deadline, retries, max_reply_bytes=max_reply_bytes, outage=outage)

    def search(self, query: str, k: int) -> list[Passage]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int) -> list[list[Passage]]:
        """One request for all ``queries``; the passages of each, best first."""
        return self.client.post({"queries": list(queries), "topk": k, "return_scores": True}, read=lambda r: read_retrieved(r, len(queries)))

    def close(self) -> None:
        self.client.close()


def read_retrieved(reply, queries: int) -> list[list[Passage]]:
    """Passages from a ``/retrieve`` reply; a reply of another shape is refused (not retried: it will not change)."""
    result = reply.get("result") if isinstance(reply, dict) else None
    if not isinstance(result, list) or len(result) != queries:
        raise ServiceError(f"the retriever's reply has no 'result' list of {queries} entries")
    out = []
    for hits in result:
        if not isinstance(hits, list):
            raise ServiceError("the retriever's reply: each 'result' entry must be a list of passages")
        out.append([retrieved_passage(hit, rank) for rank, hit in enumerate(hits)])
    return out


def retrieved_passage(hit, rank: int) -> Passage:
    """One hit: ``{"document": {...}, "score": s}`` (or a bare document). Search-R1 corpora hold ``contents`` as a
    quoted title line then the text; others give ``title`` and ``text``."""
    document = hit.get("document", hit) if isinstance(hit, dict) else None
    if not isinstance(document, dict):
        raise ServiceError("the retriever's reply: a passage is not a JSON object")
    score = hit.get("score") if isinstance(hit, dict) else None
    score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else float(-rank)
    if "contents" in document:
        title, _, text = str(document["contents"]).partition("\n")
        title = title.strip().strip('"')
    else:
        title, text = str(document.get("title", "")), str(document.get("text", ""))
    return Passage(str(document.get("id", rank)), title, text, float(score))


def format_passages(passages: list[Passage]) -> str:
    """Passages as a tool result: ``Doc 1 (Title): text`` lines, or a line saying nothing matched."""
    if not passages:
        return "No passage matched the query."
    return "\n".join(f"Doc {i} ({p.title}): {p.text}" if p.title else f"Doc {i}: {p.text}" for i, p in enumerate(passages, 1))
