"""Tests of corpus ingestion (env_workers.ingest) and ``turnrl index build``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env_workers.corpus import read_hotpotqa
from env_workers.index import BM25Index
from env_workers.ingest import (
    build_index_from_source,
    chunk_text,
    detect_layout,
    ingest_corpus,
    kilt_article_text,
)
from tests.env_workers.conftest import HOTPOTQA_PATH


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_layout(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "c.jsonl", [{"id": 7, "title": "Aa", "text": "first", "extra": 1},
                                        {"id": "b", "title": None, "text": "second"}])
    assert detect_layout(src) == "jsonl"
    stats = ingest_corpus(src, tmp_path / "out.parquet")
    assert stats.layout == "jsonl" and stats.source_records == 2 and stats.passages == 2
    assert _rows(tmp_path / "out.parquet") == [{"id": "7", "title": "Aa", "text": "first"},
                                               {"id": "b", "title": "", "text": "second"}]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"id": 1, "title": "T", "text": "x"}]))
    assert detect_layout(arr) == "jsonl"
    ingest_corpus(arr, tmp_path / "arr.parquet")
    assert _rows(tmp_path / "arr.parquet") == [{"id": "1", "title": "T", "text": "x"}]


def test_parquet_layout_is_streamed_in_batches(tmp_path: Path) -> None:
    n = 25
    pq.write_table(pa.table({"id": list(range(n)), "title": [f"T{i}" for i in range(n)],
                             "text": [None if i == 3 else f"body {i}" for i in range(n)], "junk": [0] * n}),
                   tmp_path / "c.parquet", row_group_size=7)
    assert detect_layout(tmp_path / "c.parquet") == "parquet"
    calls: list[tuple[int, int]] = []
    ingest_corpus(tmp_path / "c.parquet", tmp_path / "out.parquet", batch_size=4,
                  progress=lambda r, p: calls.append((r, p)))
    rows = _rows(tmp_path / "out.parquet")
    assert [r["id"] for r in rows] == [str(i) for i in range(n)] and rows[3]["text"] == ""
    assert max(r for r, _ in calls) <= 4 and sum(r for r, _ in calls) == n  # bounded batches
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups > 1
    assert pq.read_schema(tmp_path / "out.parquet").names == ["id", "title", "text"]


def test_dpr_tsv_layout(tmp_path: Path) -> None:
    src = tmp_path / "psgs_w100.tsv"
    src.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet, high priest, and the brother of Moses."\tAaron\n'
        '2\tPlain text without quotes, a tab-free line.\t"""Weird Al"" Yankovic"\n',
        encoding="utf-8",
    )
    assert detect_layout(src) == "dpr_tsv"
    stats = ingest_corpus(src, tmp_path / "out.parquet")
    assert stats.passages == 2
    assert _rows(tmp_path / "out.parquet") == [
        {"id": "1", "title": "Aaron", "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.'},
        {"id": "2", "title": '"Weird Al" Yankovic', "text": "Plain text without quotes, a tab-free line."},
    ]
    bad = tmp_path / "other.tsv"
    bad.write_text("a\tb\tc\n1\t2\t3\n")
    with pytest.raises(ValueError, match=r"other\.tsv.*DPR header"):
        detect_layout(bad)


KILT_RECORDS = [
    {"_id": "290", "wikipedia_id": "290", "wikipedia_title": "A",
     "text": ["A\n", "A is the first letter.\n", "Section::::History.\n", "BULLET::::- It came from aleph.\n", "  \n"],
     "anchors": [], "categories": "Letters"},
    {"_id": "303", "wikipedia_id": 303, "wikipedia_title": "Empty", "text": ["Empty\n"]},
    {"_id": "307", "wikipedia_id": "307", "wikipedia_title": "Abraham Lincoln",
     "text": ["Abraham Lincoln\n", "Abraham Lincoln was the 16th president.\n"]},
]


def test_kilt_layout_jsonl_and_parquet(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "kilt_knowledgesource.json", KILT_RECORDS)
    assert detect_layout(src) == "kilt"
    stats = ingest_corpus(src, tmp_path / "out.parquet")
    expected = [
        {"id": "290", "title": "A", "text": "A is the first letter.\nIt came from aleph."},
        {"id": "307", "title": "Abraham Lincoln", "text": "Abraham Lincoln was the 16th president."},
    ]
    assert _rows(tmp_path / "out.parquet") == expected
    assert stats.source_records == 3 and stats.passages == 2 and stats.skipped == 1
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("wikipedia_id", "wikipedia_title", "text")}
                                         for r in KILT_RECORDS if r["_id"] != "303"]), tmp_path / "kilt.parquet")
    assert detect_layout(tmp_path / "kilt.parquet") == "kilt"
    ingest_corpus(tmp_path / "kilt.parquet", tmp_path / "out2.parquet")
    assert _rows(tmp_path / "out2.parquet") == expected
    assert kilt_article_text("T", None) == "" and kilt_article_text("T", "one paragraph") == "one paragraph"


@pytest.mark.skipif(not HOTPOTQA_PATH.is_file(), reason="shared HotpotQA sample not present")
def test_hotpotqa_layout_matches_read_hotpotqa(tmp_path: Path) -> None:
    """Real data: HotpotQA dev sample (Yang et al., EMNLP 2018, CC BY-SA 4.0)."""
    assert detect_layout(HOTPOTQA_PATH) == "hotpotqa"
    stats = ingest_corpus(HOTPOTQA_PATH, tmp_path / "h.parquet", batch_size=7)
    corpus, _ = read_hotpotqa(HOTPOTQA_PATH)
    assert pq.read_table(tmp_path / "h.parquet").equals(corpus)
    assert stats.source_records == 100 and stats.passages == corpus.num_rows
    total = sum(len(r["context"]["title"]) for r in json.loads(HOTPOTQA_PATH.read_text()))
    assert stats.skipped == total - corpus.num_rows


def test_hotpotqa_original_layout_jsonl(tmp_path: Path) -> None:
    recs = [
        {"_id": "q1", "question": "Q1?", "answer": "x", "supporting_facts": [["P", 0]],
         "context": [["P", ["Para one.", " Second &amp; last."]], ["Q", ["Other."]]]},
        {"_id": "q2", "question": "Q2?", "answer": "y", "supporting_facts": [["Q", 0]],
         "context": [["Q", ["Other."]], ["R", ["Third."]]]},
    ]
    src = _jsonl(tmp_path / "hotpot_train.jsonl", recs)
    assert detect_layout(src) == "hotpotqa"
    stats = ingest_corpus(src, tmp_path / "out.parquet")
    assert _rows(tmp_path / "out.parquet") == [
        {"id": "hotpot-0", "title": "P", "text": "Para one. Second & last."},
        {"id": "hotpot-1", "title": "Q", "text": "Other."},
        {"id": "hotpot-2", "title": "R", "text": "Third."},
    ]
    assert stats.skipped == 1


def test_chunk_text() -> None:
    assert chunk_text("a  short\ntext", 5) == ["a  short\ntext"]  # untouched when it fits
    words = [f"w{i}" for i in range(300)]
    pieces = chunk_text(" ".join(words[:250]), 100)
    assert [len(p.split()) for p in pieces] == [100, 100, 50]  # a tail of half a passage stays
    pieces = chunk_text(" ".join(words[:240]), 100)
    assert [len(p.split()) for p in pieces] == [100, 140]
    pieces = chunk_text(" ".join(words[:260]), 100)
    assert [len(p.split()) for p in pieces] == [100, 100, 60]
    assert " ".join(pieces).split() == words[:260]  # nothing lost, order kept
    with pytest.raises(ValueError):
        chunk_text("x", 0)


def test_chunked_ingest(tmp_path: Path) -> None:
    long = " ".join(f"word{i}" for i in range(230))
    src = _jsonl(tmp_path / "c.jsonl", [{"id": "d1", "title": "Long", "text": long},
                                        {"id": "d2", "title": "Short", "text": "tiny text"}])
    stats = ingest_corpus(src, tmp_path / "out.parquet", chunk_words=100)
    rows = _rows(tmp_path / "out.parquet")
    assert [r["id"] for r in rows] == ["d1#0", "d1#1", "d2"]
    assert [r["title"] for r in rows] == ["Long", "Long", "Short"]
    assert " ".join(r["text"] for r in rows[:2]) == long
    assert stats.source_records == 2 and stats.passages == 3


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        detect_layout(tmp_path / "absent.jsonl")
    (tmp_path / "c.csv").write_text("id,title,text\n")
    with pytest.raises(ValueError, match=r"c\.csv.*unknown corpus file type"):
        detect_layout(tmp_path / "c.csv")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"name": "x", "body": "y"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl.*cannot tell the corpus layout.*\['body', 'name'\]"):
        detect_layout(odd)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": 1, "title": "a", "text": "b"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        ingest_corpus(broken, tmp_path / "o.parquet", batch_size=1)
    assert not (tmp_path / "o.parquet").exists() and not list(tmp_path.glob("*.partial"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        ingest_corpus(tmp_path / "empty.jsonl", tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="unknown corpus layout 'csv'"):
        ingest_corpus(broken, tmp_path / "o.parquet", layout="csv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet"):
        detect_layout(tmp_path / "junk.parquet")


def test_build_index_from_source_and_cli(tmp_path: Path) -> None:
    from learner.cli import main

    src = _jsonl(tmp_path / "c.jsonl", [
        {"id": "1", "title": "Apples", "text": "Apples are red fruit grown in orchards."},
        {"id": "2", "title": "Bananas", "text": "Bananas are long yellow fruit."},
        {"id": "3", "title": "Cherries", "text": "Cherries are small stone fruit."},
    ])
    index, stats = build_index_from_source(src, tmp_path / "idx", show_progress=False)
    assert stats.passages == 3 and len(index) == 3
    assert index.search(["yellow"], k=1)[0][0].title == "Bananas"
    assert main(["index", "build", "--input", str(src), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    loaded = BM25Index.load(tmp_path / "cli", mmap=True)
    assert [h.title for h in loaded.search(["orchard"], k=1)[0]] == ["Apples"]
    assert loaded.doc_id(2) == "3"
    assert pq.read_table(tmp_path / "cli" / "corpus.parquet").num_rows == 3
    assert main(["index", "build", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
