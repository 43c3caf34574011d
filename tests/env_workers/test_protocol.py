"""Tests of the tool-call protocol (env_workers.protocol)."""

from __future__ import annotations

import json
import time

import pytest

from env_workers.index import Hit
from env_workers.protocol import MAX_SCAN_CHARS, format_result, parse_action

R = "<reasoning>think</reasoning>\n"


def tool(payload: str) -> str:
    return f"{R}<tool>{payload}</tool>"


def call(query: object, name: object = "wiki_search") -> str:
    return tool(json.dumps({"name": name, "args": {"query": query}}))


def test_valid_paper_tool_call() -> None:
    a = parse_action(call("  Karo   Velmin "))
    assert (a.kind, a.tool_name, a.query, a.error) == ("tool", "wiki_search", "Karo Velmin", None)
    assert a.is_valid_tool_call


def test_answer_and_none() -> None:
    a = parse_action(f"{R}<answer> Ralomek </answer>")
    assert (a.kind, a.answer, a.error) == ("answer", "Ralomek", None)
    assert parse_action("I don't know").kind == "none"
    assert parse_action(R).kind == "none"
    assert parse_action(None).kind == "none"  # type: ignore[arg-type]


def test_first_action_block_wins() -> None:
    assert parse_action(f'{call("x")}<answer>y</answer>').kind == "tool"
    assert parse_action(f'{R}<answer>y</answer>{call("x")}').kind == "answer"


def test_unclosed_tags_are_tolerated_at_the_end() -> None:
    a = parse_action(R + '<tool>{"name": "wiki_search", "args": {"query": "abc"}}')
    assert a.query == "abc" and a.error is None
    assert parse_action(R + "<answer>Ralomek").answer == "Ralomek"


MALFORMED = [
    ("invalid json", tool('{"name": "wiki_search", "args": {"query": "x"}'), "invalid JSON"),
    ("not json at all", tool("search for Karo"), "invalid JSON"),
    ("json list", tool('["wiki_search", "x"]'), "must be a JSON object"),
    ("json string", tool('"wiki_search"'), "must be a JSON object"),
    ("unknown tool", call("x", name="web_search"), "unknown tool 'web_search'"),
    ("tool name not a string", call("x", name=3), "unknown tool 3"),
    ("missing args", tool('{"name": "wiki_search"}'), "'args' must be a JSON object"),
    ("args not object", tool('{"name": "wiki_search", "args": "x"}'), "'args' must be a JSON object"),
    ("missing query", tool('{"name": "wiki_search", "args": {"q": "x"}}'), "missing 'query'"),
    ("empty query", call(""), "query is empty"),
    ("blank query", call("   \n "), "query is empty"),
    ("invisible format characters", call("\u202e" * 50), "query is empty"),
    ("zero-width characters", call("\u200b\u200d\ufeff \u2060"), "query is empty"),
    ("query not string", call(42), "'query' must be a string, got int"),
    ("query is list", call(["a", "b"]), "'query' must be a string, got list"),
    ("oversized query", call("word " * 200), "query is too long"),
    ("control chars", call("Karo\x00Velmin"), "control or binary characters"),
    ("escape char", call("abc\x1b[31m"), "control or binary characters"),
    ("raw binary", tool('{"name": "wiki_search", "args": {"query": "a\x07b"}}'), "control or binary"),
    ("two tool calls", call("a") + '<tool>{"name": "wiki_search", "args": {"query": "b"}}</tool>',
     "more than one tool call"),
    ("deep nesting", tool('{"name": "wiki_search", "args": {"query": "x", "o": ' + "[" * 50 + "]" * 50 + "}}"),
     "nested too deeply"),
    ("empty tool tag", tool("  "), "empty tool call"),
]


@pytest.mark.parametrize("case,text,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_tool_calls_get_errors(case: str, text: str, message: str) -> None:
    a = parse_action(text)
    assert a.kind == "tool"
    assert a.error is not None and message in a.error, a.error
    assert a.query is None and not a.is_valid_tool_call


def test_max_query_chars_is_configurable() -> None:
    assert parse_action(call("a" * 20), max_query_chars=10).error.startswith("query is too long")
    assert parse_action(call("a" * 10), max_query_chars=10).error is None


def test_huge_and_hostile_outputs_are_fast() -> None:
    start = time.perf_counter()
    texts = [
        "<tool>" * 200_000,
        R + "<tool>" + "[" * 1_000_000 + "</tool>",
        "<reasoning>" + "x" * 5_000_000,
        R + "<answer>" + "a" * 2_000_000 + "</answer>",
    ]
    results = [parse_action(t) for t in texts]
    assert time.perf_counter() - start < 2.0
    assert results[0].error is not None and results[1].error is not None
    # Only the scanned prefix counts: the closing tag lies beyond it.
    assert results[3].kind == "answer" and len(results[3].answer) < MAX_SCAN_CHARS


def test_search_r1_protocol() -> None:
    a = parse_action("<think>hm</think><search> Karo Velmin </search>", "search_r1")
    assert (a.kind, a.query, a.error) == ("tool", "Karo Velmin", None)
    assert parse_action("<think>hm</think><search></search>", "search_r1").error == "query is empty"
    two = parse_action("<search>a</search><search>b</search>", "search_r1")
    assert "more than one tool call" in two.error
    assert parse_action("<answer>x</answer>", "search_r1").answer == "x"
    # Paper tags mean nothing to search_r1 and the other way round.
    assert parse_action(call("x"), "search_r1").kind == "none"
    assert parse_action("<search>x</search>", "paper").kind == "none"
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_action("x", "nope")


def test_format_result() -> None:
    hits = [Hit(0, 2.0, "Karo Velmin", "Karo Velmin is a baker."), Hit(1, 1.0, "Ralomek", "A city.")]
    assert format_result(hits[:1]) == "<result>\nKaro Velmin\nKaro Velmin is a baker.\n</result>"
    assert format_result(hits, max_chars=11) == "<result>\nKaro Velmin\n\nRalomek\nA c\n</result>"
    assert format_result(None, "query is empty") == "<result>\nError: query is empty\n</result>"
    assert format_result([], None, "search_r1") == "<information>\nNo results found.\n</information>"
