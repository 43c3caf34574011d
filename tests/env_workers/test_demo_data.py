"""Tests of the synthetic encyclopedia (env_workers.demo_data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env_workers.demo_data import generate_demo_data, load_questions
from env_workers.rewards import contains_answer

SMALL = dict(num_people=150, num_cities=20, num_countries=5)


def _bytes(paths: dict[str, Path]) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in paths.items()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate_demo_data(tmp_path / "a", seed=3, **SMALL)
    b = generate_demo_data(tmp_path / "b", seed=3, **SMALL)
    assert set(a) == {"corpus", "train", "eval"}
    assert _bytes(a) == _bytes(b)


def test_different_seed_differs(tmp_path: Path) -> None:
    a = generate_demo_data(tmp_path / "a", seed=3, **SMALL)
    b = generate_demo_data(tmp_path / "b", seed=4, **SMALL)
    for key in ("corpus", "train", "eval"):
        assert a[key].read_bytes() != b[key].read_bytes()


def test_schema(demo_paths: dict[str, Path]) -> None:
    corpus = pq.read_table(demo_paths["corpus"])
    assert corpus.column_names == ["id", "title", "text"]
    assert corpus.num_rows == 4000 + 300 + 24
    assert len(set(corpus.column("id").to_pylist())) == corpus.num_rows
    train = pq.read_table(demo_paths["train"])
    strings = pa.list_(pa.string())
    for col, typ in [("question", pa.string()), ("answers", strings), ("entity", pa.string()),
                     ("attribute", pa.string()), ("hops", pa.int32()), ("chain", strings)]:
        got = train.schema.field(col).type
        assert got == typ or (pa.types.is_list(got) and got.value_type == typ.value_type), col
    # 7 questions per person: 5 one-hop, 2 two-hop.
    total = train.num_rows + pq.read_table(demo_paths["eval"]).num_rows
    assert total == 7 * 4000
    hops = train.column("hops").to_pylist()
    assert hops.count(2) * 5 == hops.count(1) * 2


def test_names_are_unique_made_up_and_disjoint(demo_corpus_rows: list[dict]) -> None:
    people = [r["title"] for r in demo_corpus_rows if r["id"].startswith("person-")]
    places = [r["title"] for r in demo_corpus_rows if not r["id"].startswith("person-")]
    assert len(set(people)) == len(people)
    assert len(set(places)) == len(places)
    parts = {part for name in people for part in name.split()}
    for name in people:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
    assert not parts & set(places)


def test_split_is_by_entity(demo_paths: dict[str, Path]) -> None:
    train = load_questions(demo_paths["train"])
    ev = load_questions(demo_paths["eval"])
    train_people = {r["chain"][0] for r in train}
    eval_people = {r["chain"][0] for r in ev}
    assert len(eval_people) == 400  # eval_fraction 0.1 of 4000
    assert not train_people & eval_people
    name_re = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")
    for r in train:  # no held-out person is named in any train question
        assert not set(name_re.findall(r["question"])) & eval_people


def test_answers_appear_in_entity_article(demo_paths: dict[str, Path], demo_corpus_rows: list[dict]) -> None:
    articles = {r["title"]: r["text"] for r in demo_corpus_rows}
    rows = load_questions(demo_paths["train"]) + load_questions(demo_paths["eval"])
    for r in rows:
        assert r["entity"] == r["chain"][-1]
        for title in r["chain"]:
            assert title in articles, title
        assert contains_answer(articles[r["entity"]], r["answers"]), r
        # the person's name closes every question: a fixed distance from the search-query slot
        assert r["question"].endswith(f" {r['chain'][0]}?"), r["question"]
    two_hop = [r for r in rows if r["hops"] == 2]
    # The second hop's title is named in the first hop's article.
    assert all(r["chain"][1] in articles[r["chain"][0]] for r in two_hop)


def test_load_questions_filters_and_limits(demo_paths: dict[str, Path]) -> None:
    one_hop = load_questions(demo_paths["train"], max_hops=1)
    assert one_hop and all(r["hops"] == 1 for r in one_hop)
    assert len(load_questions(demo_paths["train"], limit=7)) == 7


def test_load_questions_jsonl_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question": "Q?", "answers": "A"}) + "\n"
                    + json.dumps({"question": "R?", "answers": ["B", "b2"], "hops": 2}) + "\n")
    rows = load_questions(good)
    assert [r["answers"] for r in rows] == [["A"], ["B", "b2"]]
    assert len(load_questions(good, max_hops=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q?", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*'answers'"):
        load_questions(bad)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_questions(tmp_path / "nope.parquet")
