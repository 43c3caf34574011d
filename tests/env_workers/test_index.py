"""Tests of the BM25 index (env_workers.index)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
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
