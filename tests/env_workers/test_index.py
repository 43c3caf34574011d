"""Tests of the BM25 index (env_workers.index), built through env_workers.bm25_build."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env_workers.corpus import read_hotpotqa
from env_workers.index import BM25Index, Hit
from tests.env_workers.conftest import HOTPOTQA_PATH


def _small_table() -> pa.Table:
    return pa.table({
        "id": ["0", "1", "2"],
        "title": ["Apples", "Bananas", "Cherries"],
        "text": ["Apples are red fruit grown in orchards.", "Bananas are long yellow fruit.",
                 "Cherries are small stone fruit."],
    })


def test_full_name_search_finds_the_person(demo_index: BM25Index, demo_corpus_rows: list[dict]) -> None:
    people = [r["title"] for r in demo_corpus_rows if r["id"].startswith("person-")]
    sample = random.Random(0).sample(people, 500)
    hits = demo_index.search(sample, k=1)
    top1 = sum(1 for name, h in zip(sample, hits) if h and h[0].title == name)
    assert top1 / len(sample) >= 0.95
    assert all(isinstance(h[0], Hit) and h[0].score > 0 for h in hits if h)


def test_city_search_finds_city_article(demo_index: BM25Index, demo_corpus_rows: list[dict]) -> None:
    cities = [r["title"] for r in demo_corpus_rows if r["id"].startswith("city-")]
    hits = demo_index.search(cities, k=1)
    top1 = sum(1 for name, h in zip(cities, hits) if h and h[0].title == name)
    assert top1 / len(cities) >= 0.95


def test_hits_are_sorted_and_k_is_respected() -> None:
    idx = BM25Index.build(_small_table())
    assert len(idx) == 3
    [hits] = idx.search(["yellow fruit bananas"], k=3)
    assert hits[0].title == "Bananas" and hits[0].doc_index == 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 3  # "fruit" matches every document
    [only] = idx.search(["bananas"], k=10)  # k above corpus size is clamped; 0-score docs dropped
    assert [h.title for h in only] == ["Bananas"]


def test_empty_stopword_and_unknown_queries_give_no_hits() -> None:
    idx = BM25Index.build(_small_table())
    res = idx.search(["", "the of and is", "zzzyx qqq", "   ", "apples"], k=2)
    assert res[:4] == [[], [], [], []]
    assert res[4][0].title == "Apples"
    assert idx.search([], k=1) == []
    assert idx.search([None], k=1) == [[]]  # type: ignore[list-item]


def test_stemming_matches_inflections() -> None:
    idx = BM25Index.build(_small_table())
    assert idx.search(["orchard"], k=1)[0][0].title == "Apples"
    plain = BM25Index.build(_small_table(), stemmer=None)
    assert plain.search(["orchard"], k=1) == [[]]


def test_save_load_and_mmap_give_identical_results(tmp_path: Path, demo_index: BM25Index,
                                                   demo_index_dir: Path, demo_paths: dict) -> None:
    from env_workers.demo_data import load_questions

    queries = [q["question"] for q in load_questions(demo_paths["eval"], limit=200)] + ["", "the"]
    expected = demo_index.search(queries, k=3)
    for mmap in (False, True):
        loaded = BM25Index.load(demo_index_dir, mmap=mmap)
        assert len(loaded) == len(demo_index)
        assert loaded.search(queries, k=3) == expected
    assert not list(demo_index_dir.glob("*.pkl"))


def test_load_missing_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a turnrl BM25 index"):
        BM25Index.load(tmp_path)


def test_build_rejects_bad_corpus() -> None:
    with pytest.raises(ValueError, match="missing column"):
        BM25Index.build(pa.table({"id": ["1"], "text": ["x"]}))


@pytest.mark.skipif(not HOTPOTQA_PATH.is_file(), reason="shared HotpotQA sample not present")
def test_real_hotpotqa_supporting_titles_are_found() -> None:
    """Index real Wikipedia paragraphs from HotpotQA and search for supporting-fact titles.

    Data: the first 100 HotpotQA dev (distractor) questions; HotpotQA, Yang et al., "HotpotQA: A
    Dataset for Diverse, Explainable Multi-hop Question Answering", EMNLP 2018, CC BY-SA 4.0.
    """
    corpus, questions = read_hotpotqa(HOTPOTQA_PATH)
    idx = BM25Index.build(corpus)
    titles = [t for q in questions for t in q["chain"]]
    hits = idx.search(titles, k=3)
    found = sum(1 for t, h in zip(titles, hits) if any(x.title == t for x in h))
    assert found / len(titles) >= 0.95, (found, len(titles))
    top1 = sum(1 for t, h in zip(titles, hits) if h and h[0].title == t)
    assert top1 / len(titles) >= 0.8, (top1, len(titles))


# --------------------------------------------------------------------------- batched / streaming build


def _bm25s_reference(table: pa.Table):
    """bm25s's own index over the same documents (the tokens of BM25Index's tokenizer)."""
    import bm25s

    from env_workers.bm25_build import make_stemmer, tokenize_bm25s

    texts = [f"{t}\n{x}" for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
    ref = bm25s.BM25(k1=1.5, b=0.75, backend="numpy")
    ref.index(tokenize_bm25s(texts, make_stemmer("english")), show_progress=False)
    return ref


def test_batched_build_scores_equal_bm25s(demo_paths: dict) -> None:
    table = pq.read_table(demo_paths["corpus"]).slice(0, 3000)
    ref = _bm25s_reference(table)
    idx = BM25Index.build(table, batch_size=257)
    queries = [[t for t in idx.query_tokens(q)] for q in table.column("title").to_pylist()[:200]]
    queries = [q for q in queries if q]
    a = ref.retrieve(queries, k=5, show_progress=False, return_as="tuple")
    b = idx.retriever.retrieve(queries, k=5, show_progress=False, return_as="tuple")
    assert (a.documents == b.documents).all() and (a.scores == b.scores).all()
    for q in queries[:20]:
        assert (ref.get_scores(q) == idx.retriever.get_scores(q)).all()
    # BM25Index.search (top-k among positive scores) returns hits as good as bm25s's: the same
    # score sequence, each hit scored as bm25s scores it (ties may pick other documents).
    titles = table.column("title").to_pylist()[:200]
    checked = 0
    for title, hits in zip(titles, idx.search(titles, k=5)):
        toks = idx.query_tokens(title)
        if not toks:
            continue
        docs, scores = ref.retrieve([toks], k=5, show_progress=False, return_as="tuple")
        assert [h.score for h in hits] == [float(s) for s in scores[0] if s > 0]
        full = ref.get_scores(toks)
        assert all(float(full[h.doc_index]) == h.score for h in hits)
        checked += 1
    assert checked > 150


def test_build_into_directory_streams_parquet_and_matches(tmp_path: Path, demo_index: BM25Index,
                                                          demo_paths: dict) -> None:
    import numpy as np

    from env_workers.demo_data import load_questions

    seen: list[int] = []
    idx = BM25Index.build(demo_paths["corpus"], out_dir=tmp_path / "idx", batch_size=500, progress=seen.append)
    assert max(seen) <= 500 and sum(seen) == 2 * len(demo_index)  # tokenising, then scoring
    assert isinstance(idx.retriever.scores["data"], np.memmap)  # loaded with mmap
    assert not (tmp_path / "idx" / ".build-tmp").exists()
    queries = [q["question"] for q in load_questions(demo_paths["eval"], limit=150)]
    assert idx.search(queries, k=3) == demo_index.search(queries, k=3)
    assert idx.doc_id(0) == pq.read_table(demo_paths["corpus"]).column("id")[0].as_py()
    reloaded = BM25Index.load(tmp_path / "idx", mmap=False)
    assert reloaded.search(queries, k=3) == demo_index.search(queries, k=3)


def test_mmap_load_does_not_copy_documents(demo_index_dir: Path) -> None:
    """With mmap the arrays are np.memmap and the Arrow docs are not copied into Arrow's memory pool."""
    import numpy as np

    before = pa.total_allocated_bytes()
    mapped = BM25Index.load(demo_index_dir, mmap=True)
    mapped_bytes = pa.total_allocated_bytes() - before
    assert all(isinstance(mapped.retriever.scores[k], np.memmap) for k in ("data", "indices", "indptr"))
    before = pa.total_allocated_bytes()
    copied = BM25Index.load(demo_index_dir, mmap=False)
    copied_bytes = pa.total_allocated_bytes() - before
    docs_size = (demo_index_dir / "docs.arrow").stat().st_size
    assert mapped_bytes < 0.05 * docs_size <= copied_bytes
    assert not isinstance(copied.retriever.scores["data"], np.memmap)
    assert mapped.search(["a"], k=1) == copied.search(["a"], k=1)


def test_streaming_build_errors_name_the_file(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*missing column"):
        BM25Index.build(tmp_path / "bad.parquet", out_dir=tmp_path / "idx")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"empty\.parquet.*empty"):
        BM25Index.build(tmp_path / "empty.parquet", out_dir=tmp_path / "idx2")
    with pytest.raises(FileNotFoundError):  # nothing loadable was left behind
        BM25Index.load(tmp_path / "idx2")
    with pytest.raises(ValueError, match="batch_size"):
        BM25Index.build(_small_table(), batch_size=0)
