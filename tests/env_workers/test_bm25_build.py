"""Tests of the BM25 index's building blocks (env_workers.bm25_build); the built index is tested in test_index.py."""

from __future__ import annotations

from env_workers.bm25_build import TermEncoder, make_stemmer, tokenize_bm25s


def test_term_encoder_matches_bm25s_tokenize() -> None:
    texts = ["Apples and ORCHARDS, running runners!", "", "the of and", "Ünïcödé ÇAFÉ straße İstanbul ﬁnance",
             "x y 12 ab_cd 3.14 e-mail don't", "Cities' citizens\tcitied\ncity"]
    stem = make_stemmer("english")
    enc = TermEncoder(stem, cache_limit=3)  # a tiny cache: clearing it must not change ids
    lengths, ids = enc.encode(texts)
    inv = {v: k for k, v in enc.vocab.items()}
    expected = tokenize_bm25s(texts, stem)
    got, pos = [], 0
    for n in lengths.tolist():
        got.append([inv[i] for i in ids[pos:pos + n].tolist()])
        pos += n
    assert got == expected
