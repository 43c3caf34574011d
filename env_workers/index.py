"""BM25 index over a corpus table, built on ``bm25s``.

Documents are indexed as ``title + "\\n" + text``, lowercased, split on word characters
(``\\b\\w\\w+\\b``, as ``bm25s.tokenize``), English stopwords removed and (when PyStemmer is
importable and asked for) Snowball-stemmed. Queries go through ``bm25s.tokenize`` with the
same settings, so a query term and a document term meet on the same stem.

Building is batched: :class:`TermEncoder` turns a batch of texts into term ids (growing one
vocabulary), each batch is reduced to ``(document, term, frequency)`` triples in NumPy, and the
BM25 score matrix (CSC, the layout ``bm25s`` scores from) is assembled from those triples once
every document length is known. Only one batch of Python strings exists at a time; with an
output directory (:meth:`BM25Index.build` ``out_dir=``) the triples are spilled to disk and the
score arrays are written in place through ``np.memmap``, so memory stays bounded by the index
itself (vocabulary plus one batch), not by the corpus. Scores are identical to
``bm25s.BM25.index`` on the same tokens (Lucene BM25 variant; tested).

On disk (:meth:`BM25Index.save`) a directory holds the ``bm25s`` arrays (``.npy``, loaded with
``allow_pickle=False``), ``docs.arrow`` (an Arrow IPC file with ``title``, ``text`` and, for
indexes built from files, ``id``; it can be memory-mapped) and ``turnrl_index.json``
(tokenizer settings). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from itertools import chain
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bm25s.tokenization import _infer_stopwords

from env_workers.corpus import CORPUS_COLUMNS, PARQUET_SUFFIXES, load_corpus, validate_corpus

logger = logging.getLogger(__name__)

META_FILE = "turnrl_index.json"
DOCS_FILE = "docs.arrow"
FORMAT_VERSION = 1
STOPWORDS = "english"
#: Longest query text looked at, in characters.
MAX_QUERY_CHARS = 2048
#: Documents per batch when building.
DEFAULT_BATCH_SIZE = 10_000
#: The token pattern of ``bm25s.tokenize`` (queries use it; documents must use the same).
TOKEN_PATTERN = r"(?u)\b\w\w+\b"

# File names ``bm25s.BM25.save``/``load`` use (the streaming build writes them directly).
_BM25S_DATA = "data.csc.index.npy"
_BM25S_INDICES = "indices.csc.index.npy"
_BM25S_INDPTR = "indptr.csc.index.npy"
_BM25S_VOCAB = "vocab.index.json"
_BM25S_PARAMS = "params.index.json"


@dataclass(frozen=True)
class Hit:
    """One search result."""

    doc_index: int
    score: float
    title: str
    text: str


def _make_stemmer(name: str | None) -> Any:
    """A PyStemmer stemmer for ``name``, or ``None`` (no stemming)."""
    if name is None:
        return None
    try:
        import Stemmer  # PyStemmer
    except ImportError:
        logger.warning("PyStemmer is not installed; indexing without stemming")
        return None
    return Stemmer.Stemmer(name)


def _tokenize(texts: list[str], stemmer: Any) -> list[list[str]]:
    return bm25s.tokenize(
        texts, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False
    )


def _doc_text(title: str | None, text: str | None) -> str:
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


class _ScoreMatrixBuilder:
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
            data = np.lib.format.open_memmap(out_dir / _BM25S_DATA, mode="w+", dtype=np.float32, shape=(self.nnz,))
            indices = np.lib.format.open_memmap(out_dir / _BM25S_INDICES, mode="w+", dtype=np.int32, shape=(self.nnz,))
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
            np.save(out_dir / _BM25S_INDPTR, indptr, allow_pickle=False)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


def _bm25s_retriever(scores: dict[str, Any], vocab: dict[str, int], k1: float, b: float) -> bm25s.BM25:
    retriever = bm25s.BM25(k1=k1, b=b, backend="numpy")
    vocab = dict(vocab)
    vocab[""] = len(vocab)  # as bm25s does (create_empty_token); its column is empty
    retriever.scores = scores
    retriever.vocab_dict = vocab
    retriever.unique_token_ids_set = set(vocab.values())
    retriever.nonoccurrence_array = None
    return retriever


def _write_bm25s_meta(out_dir: Path, vocab: dict[str, int], k1: float, b: float, num_docs: int) -> None:
    """``vocab.index.json`` and ``params.index.json`` as ``bm25s.BM25.save`` writes them."""
    vocab = dict(vocab)
    vocab[""] = len(vocab)
    (out_dir / _BM25S_VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    params = {
        "k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
        "dtype": "float32", "int_dtype": "int32", "num_docs": num_docs,
        "version": bm25s.__version__, "backend": "numpy",
    }
    (out_dir / _BM25S_PARAMS).write_text(json.dumps(params, indent=4), encoding="utf-8")


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
        try:
            pf = pq.ParquetFile(p)
        except pa.ArrowException as exc:
            raise ValueError(f"{p}: could not read as parquet ({exc})") from exc
        missing = [c for c in CORPUS_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(
                f"{p}: corpus is missing column(s) {missing}; expected columns {list(CORPUS_COLUMNS)}, "
                f"found {pf.schema_arrow.names}"
            )
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


# --------------------------------------------------------------------------- the index


class BM25Index:
    """A BM25 index with its documents; search is batched.

    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`.
    """

    def __init__(
        self,
        retriever: bm25s.BM25,
        docs: pa.Table,
        *,
        stemmer_name: str | None,
        k1: float,
        b: float,
    ) -> None:
        self._retriever = retriever
        self._docs = docs
        self._titles = docs.column("title")
        self._texts = docs.column("text")
        self.stemmer_name = stemmer_name
        self.k1 = k1
        self.b = b
        self._stemmer = _make_stemmer(stemmer_name)
        self._vocab: dict[str, int] = retriever.vocab_dict

    # ----------------------------------------------------------------- build / save / load

    @classmethod
    def build(
        cls,
        table_or_path: pa.Table | str | Path,
        *,
        stemmer: str | None = "english",
        k1: float = 1.5,
        b: float = 0.75,
        batch_size: int = DEFAULT_BATCH_SIZE,
        out_dir: str | Path | None = None,
        mmap: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> "BM25Index":
        """Index a corpus table (or a Parquet/JSONL file) with columns ``id, title, text``.

        Documents are tokenised ``batch_size`` at a time. Without ``out_dir`` the index lives
        in memory (the corpus is held as an Arrow table). With ``out_dir`` a Parquet file is
        streamed batch by batch, the index and ``docs.arrow`` are written straight into
        ``out_dir`` (as :meth:`save` would) and the result is :meth:`load`-ed from there
        (memory-mapped unless ``mmap=False``): memory stays bounded by the index, not the
        corpus. ``progress(n)`` is called after each batch of ``n`` documents (tokenising),
        and again per batch while scores are assembled.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stem = _make_stemmer(stemmer)
        stemmer_name = stemmer if stem is not None else None
        if out_dir is not None:
            return cls._build_into(table_or_path, Path(out_dir), stem, stemmer_name, k1, b, batch_size, mmap, progress)
        if isinstance(table_or_path, pa.Table):
            table = validate_corpus(table_or_path)
        else:
            table = pa.Table.from_batches(list(iter_corpus_batches(table_or_path, batch_size)))
        builder = _ScoreMatrixBuilder(TermEncoder(stem))
        for batch in table.to_batches(max_chunksize=batch_size):
            titles = batch.column("title").to_pylist()
            texts = batch.column("text").to_pylist()
            builder.add([_doc_text(t, x) for t, x in zip(titles, texts)])
            if progress is not None:
                progress(batch.num_rows)
        scores = builder.finish(k1, b)
        retriever = _bm25s_retriever(scores, builder.encoder.vocab, k1, b)
        docs = pa.table({"title": table.column("title"), "text": table.column("text")})
        logger.info("built BM25 index over %d documents (%d terms)", builder.num_docs, len(builder.encoder.vocab))
        return cls(retriever, docs, stemmer_name=stemmer_name, k1=k1, b=b)

    @classmethod
    def _build_into(
        cls,
        source: pa.Table | str | Path,
        out: Path,
        stem: Any,
        stemmer_name: str | None,
        k1: float,
        b: float,
        batch_size: int,
        mmap: bool,
        progress: Callable[[int], None] | None,
    ) -> "BM25Index":
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # an interrupted build leaves no loadable index
        batches: Iterable[pa.RecordBatch]
        if isinstance(source, pa.Table):
            batches = validate_corpus(source).to_batches(max_chunksize=batch_size)
        else:
            batches = iter_corpus_batches(source, batch_size)
        builder = _ScoreMatrixBuilder(TermEncoder(stem), spill_dir=out / ".build-tmp")
        schema = pa.schema([(c, pa.string()) for c in CORPUS_COLUMNS])
        with pa.OSFile(str(out / DOCS_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                batch = pa.RecordBatch.from_arrays([batch.column(c) for c in CORPUS_COLUMNS], schema=schema)
                writer.write_batch(batch)
                titles = batch.column("title").to_pylist()
                texts = batch.column("text").to_pylist()
                builder.add([_doc_text(t, x) for t, x in zip(titles, texts)])
                if progress is not None:
                    progress(batch.num_rows)
        if builder.num_docs == 0:
            raise ValueError(f"{source}: corpus is empty; expected rows with columns {list(CORPUS_COLUMNS)}")
        builder.finish(k1, b, out_dir=out, progress=progress)
        _write_bm25s_meta(out, builder.encoder.vocab, k1, b, builder.num_docs)
        cls._write_meta(out, stemmer_name, k1, b, builder.num_docs)
        logger.info("built BM25 index over %d documents (%d terms, %d postings) in %s",
                    builder.num_docs, len(builder.encoder.vocab), builder.nnz, out)
        return cls.load(out, mmap=mmap)

    @staticmethod
    def _write_meta(d: Path, stemmer_name: str | None, k1: float, b: float, num_docs: int) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "stemmer": stemmer_name,
            "stopwords": STOPWORDS,
            "k1": k1,
            "b": b,
            "num_docs": num_docs,
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def save(self, directory: str | Path) -> Path:
        """Write the index into ``directory`` (created if needed); returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(d), show_progress=False)
        with pa.OSFile(str(d / DOCS_FILE), "wb") as sink:
            with pa.ipc.new_file(sink, self._docs.schema) as writer:
                writer.write_table(self._docs)
        self._write_meta(d, self.stemmer_name, self.k1, self.b, len(self))
        logger.info("saved BM25 index (%d documents) to %s", len(self), d)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> "BM25Index":
        """Open an index written by :meth:`save`; ``mmap=True`` memory-maps arrays and docs."""
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d}: not a turnrl BM25 index (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            got = meta.get("format_version") if isinstance(meta, dict) else meta
            raise ValueError(f"{d}: index format {got!r}, expected {FORMAT_VERSION}")
        stemmer_name = meta.get("stemmer")
        if stemmer_name is not None and _make_stemmer(stemmer_name) is None:
            raise RuntimeError(f"{d}: index was built with the {stemmer_name!r} stemmer; install PyStemmer")
        retriever = bm25s.BM25.load(str(d), mmap=mmap, load_corpus=False, show_progress=False)
        source = pa.memory_map(str(d / DOCS_FILE), "r") if mmap else pa.OSFile(str(d / DOCS_FILE), "rb")
        docs = pa.ipc.open_file(source).read_all()
        if docs.num_rows != meta.get("num_docs"):
            raise ValueError(f"{d}: {DOCS_FILE} has {docs.num_rows} rows, index has {meta.get('num_docs')}")
        return cls(retriever, docs, stemmer_name=stemmer_name, k1=float(meta["k1"]), b=float(meta["b"]))

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return self._docs.num_rows

    @property
    def retriever(self) -> bm25s.BM25:
        """The underlying ``bm25s.BM25`` object (for benchmarks and tools)."""
        return self._retriever

    @property
    def stemmer(self) -> Any:
        """The PyStemmer object queries are stemmed with (``None``: no stemming)."""
        return self._stemmer

    def doc(self, doc_index: int) -> tuple[str, str]:
        """``(title, text)`` of document ``doc_index``."""
        return self._titles[doc_index].as_py(), self._texts[doc_index].as_py()

    def doc_id(self, doc_index: int) -> str | None:
        """The corpus ``id`` of document ``doc_index`` (``None`` if the index did not keep ids)."""
        if "id" not in self._docs.column_names:
            return None
        return self._docs.column("id")[doc_index].as_py()

    def query_tokens(self, query: str) -> list[str]:
        """The in-vocabulary terms a query is scored on (empty: the query cannot match)."""
        return self._query_tokens([query])[0]

    def _query_tokens(self, queries: Sequence[object]) -> list[list[str]]:
        texts = [q[:MAX_QUERY_CHARS] if isinstance(q, str) else "" for q in queries]
        tokens = _tokenize(texts, self._stemmer) if texts else []
        return [[t for t in toks if t in self._vocab and t] for toks in tokens]

    def _score_candidates(self, term_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(docs, scores)`` of the documents holding any query term, read from the posting lists.

        Sums the same float32 values in the same term order as ``bm25s``'s
        ``get_scores_from_ids`` (so every score is bit-identical), but only over the postings of
        the query terms instead of a vector over the whole corpus.
        """
        sc = self._retriever.scores
        data, indices, indptr = sc["data"], sc["indices"], sc["indptr"]
        segs = [(int(indptr[t]), int(indptr[t + 1])) for t in term_ids]
        parts = [np.asarray(indices[a:b]) for a, b in segs]
        if not any(len(p) for p in parts):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        merged = np.sort(np.concatenate(parts), kind="stable")  # sorted runs: radix/timsort is cheap
        first = np.empty(len(merged), dtype=bool)
        first[0] = True
        np.not_equal(merged[1:], merged[:-1], out=first[1:])
        docs = merged[first]
        scores = np.zeros(len(docs), dtype=np.float32)
        for (a, b), p in zip(segs, parts):
            np.add.at(scores, np.searchsorted(docs, p), np.asarray(data[a:b]))
        return docs, scores

    def search(self, queries: Sequence[str], k: int = 1) -> list[list[Hit]]:
        """Top-``k`` hits for each query of a batch, best first (ties: lower document index first).

        Scores are ``bm25s``'s (bit-identical, see :meth:`_score_candidates`); the work per
        query is proportional to the postings of its terms, not to the corpus size, which on a
        large corpus is far cheaper than ``bm25s.BM25.retrieve`` (a dense score vector and a
        partition over all documents). A query with no indexed term (empty, all stopwords,
        unknown words, not a string) gets ``[]``; documents scoring 0 are never returned.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        results: list[list[Hit]] = [[] for _ in queries]
        tokens = self._query_tokens(queries)
        for qi, toks in enumerate(tokens):
            if not toks:
                continue
            docs, scores = self._score_candidates([self._vocab[t] for t in toks])
            for doc_index, score in _top_k(docs, scores, k):
                title, text = self.doc(doc_index)
                results[qi].append(Hit(doc_index, score, title, text))
        return results


def _top_k(docs: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` best ``(doc, score)`` with score > 0, by score descending then doc ascending."""
    keep = scores > 0
    docs, scores = docs[keep], scores[keep]
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest score
        keep = scores >= kth  # every tie of the k-th score stays a candidate
        docs, scores = docs[keep], scores[keep]
    order = np.lexsort((docs, -scores.astype(np.float64)))[:k]
    return [(int(d), float(s)) for d, s in zip(docs[order].tolist(), scores[order].tolist())]
