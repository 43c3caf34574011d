"""Tests of prepare_data (env_workers.prepare) with user files in public layouts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from env_workers.demo_data import load_questions
from env_workers.index import BM25Index
from env_workers.prepare import prepare_data


def test_files_mode_with_dpr_corpus_and_nq_questions(tmp_path: Path) -> None:
    corpus = tmp_path / "psgs_w100.tsv"
    corpus.write_text("id\ttext\ttitle\n1\tLinda Davis sang with Reba McEntire.\tLinda Davis\n"
                      "2\tInvisible Man has 581 pages.\tInvisible Man\n", encoding="utf-8")
    nq = tmp_path / "nq.jsonl"
    nq.write_text(json.dumps({"question": "who sings does he love me with reba", "answer": ["Linda Davis"]}) + "\n")
    dcfg = SimpleNamespace(kind="files", dir=str(tmp_path / "data"), corpus_path=str(corpus),
                           train_path=str(nq), eval_path=str(nq))
    paths = prepare_data(dcfg)
    idx = BM25Index.load(paths.index_dir, mmap=True)
    assert len(idx) == 2 and idx.search(["reba"], k=1)[0][0].title == "Linda Davis"
    assert (paths.index_dir / "corpus.parquet").is_file()
    assert load_questions(paths.train)[0]["answers"] == ["Linda Davis"]
    assert prepare_data(dcfg).index_dir == paths.index_dir  # second call reuses the index


def test_damaged_files_fail_early_naming_the_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "title": ["A", "B"], "text": ["alpha beta", "gamma delta"]}), corpus)
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question": "what?", "answers": ["A"]}) + "\n")

    def prepare(corpus_path: Path = corpus, train: Path = qs, data: str = "data"):
        return prepare_data(SimpleNamespace(kind="files", dir=str(tmp_path / data), corpus_path=str(corpus_path),
                                            train_path=str(train), eval_path=str(qs)))

    index_dir = prepare().index_dir
    for f in sorted(index_dir.iterdir()):  # every file of a saved index, cut in half
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError) as e:
            prepare()
        assert str(f) in str(e.value) and "delete the directory to rebuild" in str(e.value), str(e.value)
        f.write_bytes(data)
    assert prepare().index_dir == index_dir  # intact again
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(corpus.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{cut}: could not read as parquet"):
        prepare(corpus_path=cut, data="data2")
    truncated_q = tmp_path / "cut.jsonl"
    truncated_q.write_text('{"question": "x", "answers": ["y"]}\n{"question": "x", "answ')
    with pytest.raises(ValueError, match=f"{truncated_q}: line 2 is not valid JSON"):
        prepare(train=truncated_q)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"foo": [1]}), wrong)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question', 'answers'\]"):
        prepare(train=wrong)
    with pytest.raises(ValueError, match="cannot tell the corpus layout"):
        prepare(corpus_path=wrong, data="data3")
