"""BM25 for the search tool: opd's SQLite FTS5 index vs the ``bm25s`` package, on one generated corpus.

    .venv/bin/python benchmarks/bench_search.py                 # FTS5 only
    pip install bm25s && .venv/bin/python benchmarks/bench_search.py   # both

A corpus of ``--docs`` fictional passages (a title, a sentence naming a place and a year, 50 filler words
drawn from 3,000 invented ones) and ``--queries`` questions, each asking for one passage's year by its
title. Reports index build time, mean time per query (top 5) and recall@5 (the asked-about passage
among the five). Titles collide now and then (they are drawn from 16 syllables), which caps recall.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402

from opd.episodes.search import BM25Index, Passage  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "vax", "bel", "quin", "dra", "sho", "ul", "fen", "gar", "ith", "zo", "pe"]


def corpus(docs: int, queries: int, seed: int = 0) -> tuple[list[Passage], list[tuple[str, int]]]:
    rng = random.Random(seed)
    name = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()  # noqa: E731
    words = [name().lower() for _ in range(3000)]
    passages = []
    for i in range(docs):
        title = name()
        kind = rng.choice(["river", "city", "scholar", "ship", "guild"])
        filler = " ".join(rng.choice(words) for _ in range(50))
        passages.append(Passage(str(i), title, f"{title} is a {kind} of {name()}. {filler} It was founded in {rng.randint(1000, 2000)} by {name()}."))
    asked = [rng.randrange(docs) for _ in range(queries)]
    return passages, [(f"When was {passages[j].title} founded?", j) for j in asked]


def run_fts5(passages, questions, k):
    start = time.perf_counter()
    index = BM25Index(passages, title_weight=1.0)
    build = time.perf_counter() - start
    start, hits = time.perf_counter(), 0
    for question, j in questions:
        hits += str(j) in [p.id for p in index.search(question, k)]
    return build, (time.perf_counter() - start) / len(questions), hits / len(questions)


def run_bm25s(passages, questions, k):
    import bm25s

    start = time.perf_counter()
    retriever = bm25s.BM25(k1=1.2, b=0.75)
    retriever.index(bm25s.tokenize([f"{p.title} {p.text}" for p in passages], stopwords=None, show_progress=False), show_progress=False)
    build = time.perf_counter() - start
    start, hits = time.perf_counter(), 0
    for question, j in questions:
        found, _ = retriever.retrieve(bm25s.tokenize([question], stopwords=None, show_progress=False), k=k, show_progress=False)
        hits += j in found[0].tolist()
    return build, (time.perf_counter() - start) / len(questions), hits / len(questions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args()
    passages, questions = corpus(args.docs, args.queries)
    impls = [("opd BM25Index (SQLite FTS5)", run_fts5)]
    try:
        import bm25s  # noqa: F401

        impls.append(("bm25s", run_bm25s))
    except ImportError:
        print("(bm25s not installed: pip install bm25s to compare)")
    print(f"# BM25 search, {args.docs} passages, {args.queries} questions, top {args.k} — {machine()}\n")
    print("| index | build ms | ms / query | recall@5 |")
    print("|---|---|---|---|")
    for label, fn in impls:
        build, per_query, recall = fn(passages, questions, args.k)
        print(f"| {label} | {build * 1e3:.0f} | {per_query * 1e3:.2f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
