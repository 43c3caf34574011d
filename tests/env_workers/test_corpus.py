"""Tests of corpus loading (env_workers.corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env_workers.corpus import load_corpus, read_hotpotqa
from tests.env_workers.conftest import HOTPOTQA_PATH


def test_load_parquet_and_jsonl(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2], "title": ["A", None], "text": ["x", "y"], "extra": [0, 0]}),
                   tmp_path / "c.parquet")
    t = load_corpus(tmp_path / "c.parquet")
    assert t.column_names == ["id", "title", "text"]
    assert t.to_pylist() == [{"id": "1", "title": "A", "text": "x"}, {"id": "2", "title": "", "text": "y"}]
    (tmp_path / "c.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"id": 7, "title": "T", "text": "body"}, {"id": "b", "title": "U", "text": "more"}])
    )
    t2 = load_corpus(tmp_path / "c.jsonl")
    assert t2.column("id").to_pylist() == ["7", "b"]
    assert t2.column("text").to_pylist() == ["body", "more"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        load_corpus(tmp_path / "absent.parquet")


def test_missing_columns_names_file_and_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*\['title', 'text'\].*expected columns \['id', 'title', 'text'\]"):
        load_corpus(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "title": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*\['text'\]"):
        load_corpus(tmp_path / "bad.jsonl")


def test_empty_corpus(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"empty\.parquet.*empty.*\['id', 'title', 'text'\]"):
        load_corpus(tmp_path / "empty.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        load_corpus(tmp_path / "empty.jsonl")


def test_garbage_and_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="junk.parquet"):
        load_corpus(tmp_path / "junk.parquet")
    (tmp_path / "junk.jsonl").write_text('{"id": 1, "title": "a", "text": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"junk\.jsonl: line 2"):
        load_corpus(tmp_path / "junk.jsonl")
    (tmp_path / "c.csv").write_text("id,title,text\n")
    with pytest.raises(ValueError, match=r"c\.csv.*unknown file type"):
        load_corpus(tmp_path / "c.csv")


@pytest.mark.skipif(not HOTPOTQA_PATH.is_file(), reason="shared HotpotQA sample not present")
def test_read_hotpotqa() -> None:
    """HotpotQA sample (Yang et al., EMNLP 2018; CC BY-SA 4.0): paragraphs and questions."""
    corpus, questions = read_hotpotqa(HOTPOTQA_PATH)
    assert len(questions) == 100
    assert 900 <= corpus.num_rows <= 1000  # ~10 paragraphs per question, repeats kept once
    titles = set(corpus.column("title").to_pylist())
    texts = corpus.column("text").to_pylist()
    assert not any("&amp;" in t for t in texts)
    for q in questions:
        assert set(q["chain"]) <= titles
    # The first paragraph of the first record, joined from its sentences.
    first = json.loads(HOTPOTQA_PATH.read_text())[0]["context"]
    assert texts[0] == "".join(first["sentences"][0]).strip()
