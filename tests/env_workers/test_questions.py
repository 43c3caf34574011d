"""Tests of question-file layouts (env_workers.questions via demo_data.load_questions)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env_workers.corpus import read_hotpotqa
from env_workers.demo_data import load_questions
from env_workers.env import WikiSearchEnv
from env_workers.index import BM25Index
from env_workers.questions import detect_question_layout
from tests.env_workers.conftest import HOTPOTQA_PATH

TRIVIAQA = [
    {"question": "Which city hosted the 1900 Olympics?", "question_id": "tc_1",
     "answer": {"value": "Paris", "aliases": ["Paris", "Paris, France"], "normalized_aliases": ["paris", "paris france"],
                "type": "WikipediaEntity", "normalized_value": "paris", "matched_wiki_entity_name": ""}},
    {"question": "Who wrote Hamlet?", "question_id": "tc_2",
     "answer": {"value": "William Shakespeare", "aliases": ["Shakespeare"], "normalized_aliases": ["shakespeare"],
                "type": "WikipediaEntity", "normalized_value": "william shakespeare", "matched_wiki_entity_name": ""}},
]
NQ_OPEN = [
    {"question": "who sings does he love me with reba", "answer": ["Linda Davis"]},
    {"question": "how many pages is invisible man by ralph ellison", "answer": ["581 (second edition)", "581"]},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_triviaqa_layout_jsonl_and_parquet(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "trivia.jsonl", TRIVIAQA)
    pq.write_table(pa.Table.from_pylist(TRIVIAQA), tmp_path / "trivia.parquet")
    for path in (src, tmp_path / "trivia.parquet"):
        assert detect_question_layout(path) == "triviaqa"
        rows = load_questions(path)
        assert [r["question"] for r in rows] == [r["question"] for r in TRIVIAQA]
        assert rows[0]["answers"] == ["Paris", "Paris, France", "paris", "paris france"]
        assert rows[1]["answers"] == ["William Shakespeare", "Shakespeare", "shakespeare"]
        assert rows[0]["question_id"] == "tc_1" and rows[0]["hops"] == 1
    assert len(load_questions(src, limit=1)) == 1


def test_nq_open_layout_jsonl_and_parquet(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "nq.jsonl", NQ_OPEN)
    pq.write_table(pa.Table.from_pylist(NQ_OPEN), tmp_path / "nq.parquet")
    for path in (src, tmp_path / "nq.parquet"):
        assert detect_question_layout(path) == "nq_open"
        rows = load_questions(path)
        assert [r["answers"] for r in rows] == [["Linda Davis"], ["581 (second edition)", "581"]]


@pytest.mark.skipif(not HOTPOTQA_PATH.is_file(), reason="shared HotpotQA sample not present")
def test_hotpotqa_layout_real_sample() -> None:
    """HotpotQA dev sample (Yang et al., EMNLP 2018, CC BY-SA 4.0) read through `datasets`."""
    assert detect_question_layout(HOTPOTQA_PATH) == "hotpotqa"
    rows = load_questions(HOTPOTQA_PATH)
    _, expected = read_hotpotqa(HOTPOTQA_PATH)
    assert len(rows) == 100
    for got, exp in zip(rows, expected):
        for key in ("question", "answers", "entity", "attribute", "hops", "chain"):
            assert got[key] == exp[key], key
    assert load_questions(HOTPOTQA_PATH, max_hops=1) == []  # every question has two supporting titles
    assert len(load_questions(HOTPOTQA_PATH, limit=5)) == 5


def test_hotpotqa_original_layout_jsonl(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "hp.jsonl", [{"_id": "a1", "question": "Q?", "answer": "Tom &amp; Jerry", "type": "bridge",
                                          "supporting_facts": [["P", 0], ["Q", 1], ["P", 2]], "context": []}])
    [row] = load_questions(src)
    assert row["answers"] == ["Tom & Jerry"] and row["chain"] == ["P", "Q"] and row["hops"] == 2
    assert row["question_id"] == "a1" and row["attribute"] == "bridge"


def test_explicit_layout_and_errors(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "nq.jsonl", NQ_OPEN)
    assert load_questions(src, layout="nq_open")[0]["answers"] == ["Linda Davis"]
    with pytest.raises(ValueError, match="unknown question layout 'squad'"):
        load_questions(src, layout="squad")
    with pytest.raises(ValueError, match=r"nq\.jsonl: record 0 is not a triviaqa question"):
        load_questions(src, layout="triviaqa")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "Q?", "answer": 5}])
    with pytest.raises(ValueError, match=r"odd\.jsonl.*cannot tell the question layout"):
        load_questions(odd)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "answer": "A"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*'answers'"):  # falls back to this project's layout
        load_questions(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_questions(tmp_path / "nope.jsonl")
    empty_answers = _jsonl(tmp_path / "e.jsonl", [{"question": "Q?", "answer": []}, NQ_OPEN[0]])
    assert [r["answers"] for r in load_questions(empty_answers)] == [["Linda Davis"]]  # unanswerable dropped


def test_external_rows_drive_an_episode(tmp_path: Path) -> None:
    idx = BM25Index.build(pa.table({"id": ["1"], "title": ["Olympics 1900"], "text": ["Paris hosted the games."]}))
    [row, _] = load_questions(_jsonl(tmp_path / "t.jsonl", TRIVIAQA))
    env = WikiSearchEnv(idx)
    assert env.reset(row)[1]["content"] == row["question"]
    res = env.step('<reasoning>r</reasoning><tool>{"name": "wiki_search", "args": {"query": "1900 Olympics"}}</tool>')
    assert res.turn_reward["result_contains_answer"] == 0.5
    res = env.step("<reasoning>r</reasoning><answer>paris, france</answer>")
    assert res.outcome_reward["exact_match"] == 1.0
