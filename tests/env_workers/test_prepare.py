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
