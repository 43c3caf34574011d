"""Building blocks of the BM25 index (:mod:`env_workers.index`): tokenising, the score matrix, corpus batches.

Building is batched: :class:`TermEncoder` turns a batch of texts into term ids (growing one
vocabulary), each batch is reduced to ``(document, term, frequency)`` triples in NumPy, and the
BM25 score matrix (CSC, the layout ``bm25s`` scores from) is assembled from those triples once
every document length is known (:class:`ScoreMatrixBuilder`). Only one batch of Python strings
exists at a time; with a spill directory the triples go to disk and the score arrays are written
in place through ``np.memmap``, so memory stays bounded by the index itself (vocabulary plus one
batch), not by the corpus. Scores are identical to ``bm25s.BM25.index`` on the same tokens
(Lucene BM25 variant; ``tests/env_workers/test_index.py``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bm25s.tokenization import _infer_stopwords

from env_workers.corpus import CORPUS_COLUMNS, PARQUET_SUFFIXES, load_corpus, open_parquet, validate_corpus

logger = logging.getLogger(__name__)

STOPWORDS = "english"
#: Documents per batch when building.
DEFAULT_BATCH_SIZE = 10_000
#: The token pattern of ``bm25s.tokenize`` (queries use it; documents must use the same).
TOKEN_PATTERN = r"(?u)\b\w\w+\b"

# File names ``bm25s.BM25.save``/``load`` use (the streaming build writes them directly).
BM25S_DATA = "data.csc.index.npy"
BM25S_INDICES = "indices.csc.index.npy"
BM25S_INDPTR = "indptr.csc.index.npy"
BM25S_VOCAB = "vocab.index.json"
BM25S_PARAMS = "params.index.json"


def make_stemmer(name: str | None) -> Any:
    """A PyStemmer stemmer for ``name``, or ``None`` (no stemming)."""
    if name is None:
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError:
        logger.warning("PyStemmer is not installed; indexing without stemming")
        return None
    return Stemmer.Stemmer(name)


def tokenize_bm25s(texts: list[str], stemmer: Any) -> list[list[str]]:
    return bm25s.tokenize(
        texts, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False
    )


def doc_text(title: str | None, text: str | None) -> str:
    return f"{title or ''}\n{text or ''}"

# --------------------------------------------------------------------------- tokenising


class TermEncoder:
    """Text to term ids, growing one vocabulary (stem -> id, ids in order of first sight).

    Produces exactly the terms of ``bm25s.tokenize(texts, stopwords="english",
    stemmer=...)``: lowercase, :data:`TOKEN_PATTERN`, stopwords dropped before stemming.
    A cache of surface word -> id keeps stemming off the hot path; it is cleared when it
    holds more than ``cache_limit`` words so it cannot grow without bound.
    """

    def __init__(self, stemmer: Any, *, cache_limit: int = 2_000_000) -> None:
        self._stem: Callable[[str], str] | None = stemmer.stemWord if stemmer is not None else None
        self._stop = frozenset(_infer_stopwords(STOPWORDS))
        self._split = re.compile(TOKEN_PATTERN).findall
        self.vocab: dict[str, int] = {}
        self._word_ids: dict[str, int] = {}
        self._cache_limit = cache_limit

    def _word_id(self, word: str) -> int:
        if word in self._stop:
            tid = -1
        else:
            term = self._stem(word) if self._stem is not None else word
            tid = self.vocab.get(term, -1)
            if tid < 0:
                tid = len(self.vocab)
                self.vocab[term] = tid
        self._word_ids[word] = tid
        return tid

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths int64[B], ids int64[sum(lengths)])``: term ids of every text, concatenated.

        The per-word work runs in C (regex ``findall``, ``set``, ``map`` over the cache); only
        words not seen before go through the stemmer.
        """
        if len(self._word_ids) >= self._cache_limit:
            self._word_ids.clear()
        split = self._split
        words_per_text = [split(t.lower()) for t in texts]
        counts = np.fromiter(map(len, words_per_text), dtype=np.int64, count=len(texts))
        flat = list(chain.from_iterable(words_per_text))
        cache = self._word_ids
        for w in set(flat).difference(cache):
            self._word_id(w)
        ids = np.fromiter(map(cache.__getitem__, flat), dtype=np.int64, count=len(flat))
        keep = ids >= 0
        lengths = np.bincount(np.repeat(np.arange(len(texts), dtype=np.int64), counts)[keep], minlength=len(texts))
        return lengths.astype(np.int64), ids[keep]


# --------------------------------------------------------------------------- score matrix


class ScoreMatrixBuilder:
    """Accumulates ``(document, term, frequency)`` triples batch by batch; then BM25 CSC arrays.

    Per batch it keeps ``nuniq`` (distinct terms per document), ``terms`` and ``tf`` (int32),
    in memory or as ``.npy`` files under ``spill_dir``.
    """

    def __init__(self, encoder: TermEncoder, spill_dir: Path | None = None) -> None:
        self.encoder = encoder
        self.spill_dir = spill_dir
        self._lengths: list[np.ndarray] = []
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray] | int] = []
        self._df = np.zeros(0, dtype=np.int64)
        self.num_docs = 0
        self.nnz = 0
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)

    def add(self, texts: Sequence[str]) -> None:
        lengths, ids = self.encoder.encode(texts)
        n = len(texts)
        doc_local = np.repeat(np.arange(n, dtype=np.int64), lengths)
        keys, tf = np.unique((doc_local << 32) | ids, return_counts=True)  # sorted by (doc, term)
        terms = (keys & 0xFFFFFFFF).astype(np.int32)
        nuniq = np.bincount(keys >> 32, minlength=n).astype(np.int32)
        vocab_size = len(self.encoder.vocab)
        if len(self._df) < vocab_size:
            self._df = np.concatenate([self._df, np.zeros(vocab_size - len(self._df), dtype=np.int64)])
        self._df += np.bincount(terms, minlength=vocab_size)
        part = (nuniq, terms, tf.astype(np.int32))
        if self.spill_dir is not None:
            k = len(self._parts)
            for name, arr in zip(("nuniq", "terms", "tf"), part):
                np.save(self.spill_dir / f"{k:06d}.{name}.npy", arr, allow_pickle=False)
            self._parts.append(k)
        else:
            self._parts.append(part)
        self._lengths.append(lengths.astype(np.int32))
        self.num_docs += n
        self.nnz += len(terms)

    def _part(self, p: tuple[np.ndarray, np.ndarray, np.ndarray] | int) -> tuple[np.ndarray, ...]:
        if isinstance(p, int):
            assert self.spill_dir is not None
            return tuple(np.load(self.spill_dir / f"{p:06d}.{n}.npy", allow_pickle=False)
                         for n in ("nuniq", "terms", "tf"))
        return p

    def finish(
        self, k1: float, b: float, out_dir: Path | None = None, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """BM25 (Lucene) score arrays ``{data, indices, indptr, num_docs}`` as ``bm25s`` holds them.

        ``score(d, t) = idf(t) * tf / (k1 * (1 - b + b * len(d) / avgdl) + tf)`` with
        ``idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))``, computed in float64 and stored as
        float32 exactly as ``bm25s`` does. Column ``V`` (the empty token ``""``) is empty.
        With ``out_dir`` the arrays are ``.npy`` files there, opened as memory maps.
        """
        n_docs, vocab_size = self.num_docs, len(self.encoder.vocab)
        if n_docs == 0:
            raise ValueError("cannot build a BM25 index over zero documents")
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        avgdl = np.asarray(lengths, dtype=np.int64).mean()
        df = self._df[:vocab_size]
        idf = np.array([math.log(1 + (n_docs - d + 0.5) / (d + 0.5)) for d in df.tolist()], dtype=np.float32)
        indptr = np.zeros(vocab_size + 2, dtype=np.int64)
        np.cumsum(df, out=indptr[1 : vocab_size + 1])
        indptr[vocab_size + 1] = indptr[vocab_size]
        if out_dir is not None:
            data = np.lib.format.open_memmap(out_dir / BM25S_DATA, mode="w+", dtype=np.float32, shape=(self.nnz,))
            indices = np.lib.format.open_memmap(out_dir / BM25S_INDICES, mode="w+", dtype=np.int32, shape=(self.nnz,))
        else:
            data = np.empty(self.nnz, dtype=np.float32)
            indices = np.empty(self.nnz, dtype=np.int32)
        cursor = indptr[:vocab_size].copy()
        doc_offset = 0
        for p in self._parts:
            nuniq, terms, tf = self._part(p)
            n = len(nuniq)
            doc_local = np.repeat(np.arange(n, dtype=np.int64), nuniq)
            l_d = lengths[doc_offset + doc_local].astype(np.float64)
            tff = tf.astype(np.float64)
            tfc = tff / (k1 * ((1 - b) + b * l_d / avgdl) + tff)
            scores = (idf[terms].astype(np.float64) * tfc).astype(np.float32)
            order = np.argsort(terms, kind="stable")  # by term, documents ascending within a term
            t_sorted = terms[order]
            rank = np.arange(len(t_sorted), dtype=np.int64) - np.searchsorted(t_sorted, t_sorted, side="left")
            pos = cursor[t_sorted] + rank
            data[pos] = scores[order]
            indices[pos] = (doc_local[order] + doc_offset).astype(np.int32)
            cursor += np.bincount(t_sorted, minlength=vocab_size)
            doc_offset += n
            if progress is not None:
                progress(n)
        if out_dir is not None:
            data.flush()
            indices.flush()
            np.save(out_dir / BM25S_INDPTR, indptr, allow_pickle=False)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


def bm25s_retriever(scores: dict[str, Any], vocab: dict[str, int], k1: float, b: float) -> bm25s.BM25:
    retriever = bm25s.BM25(k1=k1, b=b, backend="numpy")
    vocab = dict(vocab)
    vocab[""] = len(vocab)  # as bm25s does (create_empty_token); its column is empty
    retriever.scores = scores
    retriever.vocab_dict = vocab
    retriever.unique_token_ids_set = set(vocab.values())
    retriever.nonoccurrence_array = None
    return retriever


def write_bm25s_meta(out_dir: Path, vocab: dict[str, int], k1: float, b: float, num_docs: int) -> None:
    """``vocab.index.json`` and ``params.index.json`` as ``bm25s.BM25.save`` writes them."""
    vocab = dict(vocab)
    vocab[""] = len(vocab)
    (out_dir / BM25S_VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    params = {
        "k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
        "dtype": "float32", "int_dtype": "int32", "num_docs": num_docs,
        "version": bm25s.__version__, "backend": "numpy",
    }
    (out_dir / BM25S_PARAMS).write_text(json.dumps(params, indent=4), encoding="utf-8")


# --------------------------------------------------------------------------- corpus batches


def _string_batch(batch: pa.RecordBatch, source: str) -> pa.RecordBatch:
    """Columns ``id, title, text`` of ``batch`` as non-null strings."""
    table = validate_corpus(pa.Table.from_batches([batch]), source=source)
    return table.combine_chunks().to_batches()[0] if table.num_rows else batch


def iter_corpus_batches(path: str | Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
    """Record batches (``id, title, text`` strings) of a corpus file; Parquet is streamed.

    JSON Lines files are read whole with :func:`load_corpus` (turn large ones into Parquet
    with ``turnrl index build`` / :func:`env_workers.ingest.ingest_corpus` first).
    """
    p = Path(path)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        pf = open_parquet(p, CORPUS_COLUMNS, what="corpus is ")
        if pf.metadata.num_rows == 0:
            raise ValueError(f"{p}: corpus is empty; expected rows with columns {list(CORPUS_COLUMNS)}")
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(CORPUS_COLUMNS)):
            if batch.num_rows:
                yield _string_batch(batch, str(p))
        return
    yield from load_corpus(p).to_batches(max_chunksize=batch_size)


def count_corpus_rows(path: str | Path) -> int | None:
    """Number of rows of a Parquet corpus from its metadata (``None`` for other files)."""
    p = Path(path)
    if p.suffix.lower() in PARQUET_SUFFIXES and p.is_file():
        return pq.ParquetFile(p).metadata.num_rows
    return None
