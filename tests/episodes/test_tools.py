"""Tool calls (Hermes / Qwen format), the BM25 search index against an independent BM25, and the Search-R1
retriever client against a real HTTP server on loopback."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import Server

from opd.episodes.search import BM25Index, HTTPRetriever, Passage, format_passages
from opd.episodes.tool_calls import SearchTool, ToolCall, parse_tool_calls, run_call
from opd.services.http import ServiceError
from opd.tasks.rows import DataError
from opd.tasks.search_qa import read_corpus

# ----------------------------------------------------------------------------- tool calls


def test_well_formed_calls_are_read_in_order():
    text = (
        'Let me look.<tool_call>\n{"name": "search", "arguments": {"query": "Kalo river"}}\n</tool_call>'
        '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"Mirentor\\"}"}</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == [ToolCall("search", {"query": "Kalo river"}), ToolCall("search", {"query": "Mirentor"})]
    assert parsed.problems == []
    assert parse_tool_calls("The answer is 42.") == parse_tool_calls("") and not parse_tool_calls("x").calls


@pytest.mark.parametrize(
    "text, problem",
    [
        ('<tool_call>{"name": "search", "arguments": {"query": }}</tool_call>', "not valid JSON"),
        ('<tool_call>["search"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {"query": "x"}}</tool_call>', "has no 'name'"),
        ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', "arguments of 'search' must be a JSON object"),
        ('<tool_call>{"name": "search", "arguments": {"query": "x"}}', "never closed"),
    ],
)
def test_a_malformed_call_becomes_a_problem_in_words(text, problem):
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and len(parsed.problems) == 1 and problem in parsed.problems[0]


def test_an_unknown_tool_or_bad_arguments_answer_with_what_was_wrong():
    tools = {"search": SearchTool(BM25Index([Passage("1", "A", "alpha")]))}
    observation, ok = run_call(tools, ToolCall("browse", {"url": "x"}))
    assert not ok and "no tool 'browse'" in observation and "search" in observation
    observation, ok = run_call(tools, ToolCall("search", {"q": "alpha"}))
    assert not ok and "non-empty string 'query'" in observation
    observation, ok = run_call(tools, ToolCall("search", {"query": "alpha"}))
    assert ok and observation == "Doc 1 (A): alpha"


# ----------------------------------------------------------------------------- BM25


CORPUS = [
    Passage("1", "", "the kalo river flows past mirentor into the grey sea"),
    Passage("2", "", "mirentor is a city founded in 1204 by the guild of shovax"),
    Passage("3", "", "the guild of shovax built ships and traded salt salt salt"),
    Passage("4", "", "a scholar of the grey sea wrote about rivers and ships"),
    Passage("5", "", "nothing here but words about the weather and the weather"),
]


def independent_bm25(passages, query, k1=1.2, b=0.75):
    """Okapi BM25 written out: Σ_q idf(q) · f(q,D)(k1+1) / (f(q,D) + k1(1 − b + b|D|/avgdl)), idf = ln((N−n+½)/(n+½)),
    a negative idf floored at 1e-6 (as SQLite does)."""
    docs = [re.findall(r"\w+", p.text.lower()) for p in passages]
    n_docs, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = {}
    for p, words in zip(passages, docs):
        total = 0.0
        for q in dict.fromkeys(re.findall(r"\w+", query.lower())):
            n = sum(q in d for d in docs)
            f = words.count(q)
            if f:
                idf = max(math.log((n_docs - n + 0.5) / (n + 0.5)), 1e-6)
                total += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(words) / avgdl))
        if total:
            scores[p.id] = total
    return scores


@pytest.mark.parametrize("query", ["mirentor guild", "salt ships", "the grey sea", "weather"])
def test_scores_equal_okapi_bm25_written_out(query):
    index = BM25Index(CORPUS)
    hits = index.search(query, k=5)
    expected = independent_bm25(CORPUS, query)
    assert {h.id for h in hits} == set(expected)
    for h in hits:
        assert h.score == pytest.approx(expected[h.id], rel=1e-9)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_the_passage_that_answers_ranks_first_and_titles_count_more():
    passages = [Passage("a", "Shovax", "a guild of traders"), Passage("b", "Guilds", "shovax is mentioned once here among many other words")]
    assert BM25Index(passages).search("shovax", k=2)[0].id == "a"
    assert BM25Index(CORPUS).search("When was Mirentor founded?", k=1)[0].id == "2"


def test_any_query_text_is_safe_and_k_bounds_the_hits():
    index = BM25Index(CORPUS)
    for query in ['"unbalanced', "NEAR(salt ships) AND *", "river OR", "-- ; drop table passages", "   ", "?!"]:
        assert isinstance(index.search(query, 3), list)
    assert index.search("   ", 3) == [] and len(index.search("the", 2)) == 2 and index.size == 5


def test_an_index_file_is_reused_while_its_passages_are_the_same_and_rebuilt_when_they_change(tmp_path):
    path = tmp_path / "corpus.sqlite"
    first = BM25Index(CORPUS, path=path).search("guild", 3)
    modified = path.stat().st_mtime_ns
    assert BM25Index(CORPUS, path=path).search("guild", 3) == first and path.stat().st_mtime_ns == modified  # not rewritten
    changed = CORPUS[:2] + [Passage("9", "", "a new guild of weavers")]
    again = BM25Index(changed, path=path)
    assert again.size == 3 and "9" in [p.id for p in again.search("guild", 3)] and "3" not in [p.id for p in again.search("guild", 3)]


def test_corpus_rows_are_checked_naming_file_line_and_field(tmp_path):
    good = tmp_path / "corpus.jsonl"
    good.write_text(json.dumps({"id": 1, "title": "T", "text": "x"}) + "\n\n" + json.dumps({"id": "2", "text": "y"}) + "\n")
    assert read_corpus(good) == [Passage("1", "T", "x"), Passage("2", "", "y")]
    for rows, problem in [
        ([{"id": "1"}], r":1: field 'text' is missing"),
        ([{"id": "1", "text": "a"}, {"id": "1", "text": "b"}], r":2: id '1' appears twice"),
        ([{"id": "1", "text": "a", "title": 3}], r":1: field 'title' must be a string"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=problem):
            read_corpus(bad)
    (tmp_path / "torn.jsonl").write_text('{"id": "1", "text": "a"}\n{"id": \n')
    with pytest.raises(DataError, match=r"torn.jsonl:2: not valid JSON"):
        read_corpus(tmp_path / "torn.jsonl")


def test_passages_render_as_a_tool_result():
    assert format_passages([]) == "No passage matched the query."
    assert format_passages([Passage("1", "T", "x"), Passage("2", "", "y")]) == "Doc 1 (T): x\nDoc 2: y"


# ----------------------------------------------------------------------------- Search-R1 /retrieve


def respond_json(body):
    def respond(handler):
        data = json.dumps(body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return respond


def test_the_retriever_sends_search_r1_requests_and_reads_its_passages(monkeypatch):
    reply = {"result": [
        [{"document": {"id": "7", "contents": '"Mirentor"\nMirentor is a city.'}, "score": 0.9}, {"document": {"title": "K", "text": "t"}, "score": 0.5}],
        [],
    ]}
    with Server(respond_json(reply)) as server:
        retriever = HTTPRetriever(server.url.replace("/v1/chat/completions", "/retrieve"), api_key="sk-local", deadline=5, retries=0)
        got = retriever.search_many(["where is mirentor", "nothing"], k=2)
        retriever.close()
    assert got == [[Passage("7", "Mirentor", "Mirentor is a city.", 0.9), Passage("1", "K", "t", 0.5)], []]
    path, headers, body = server.requests[0]
    assert path == "/retrieve" and json.loads(body) == {"queries": ["where is mirentor", "nothing"], "topk": 2, "return_scores": True}
    assert headers["Authorization"] == "Bearer sk-local"


def test_a_retriever_reply_of_another_shape_is_one_error_and_not_retried():
    with Server(respond_json({"results": []})) as server:
        retriever = HTTPRetriever(server.url, deadline=5, retries=3)
        with pytest.raises(ServiceError, match="no 'result' list of 1 entries"):
            retriever.search("x", 3)
        retriever.close()
    assert len(server.requests) == 1
