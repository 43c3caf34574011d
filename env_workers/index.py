"""BM25 index over a corpus table, built on ``bm25s``.

Documents are indexed as ``title + "\\n" + text``, lowercased, split on word characters
(``\\b\\w\\w+\\b``, as ``bm25s.tokenize``), English stopwords removed and (when PyStemmer is
importable and asked for) Snowball-stemmed. Queries go through ``bm25s.tokenize`` with the
same settings, so a query term and a document term meet on the same stem.

Building is batched and, with an output directory (:meth:`BM25Index.build` ``out_dir=``),
bounded in memory by the index rather than the corpus; the pieces (term encoding, the score
matrix, corpus batches) live in :mod:`env_workers.bm25_build`.

On disk (:meth:`BM25Index.save`) a directory holds the ``bm25s`` arrays (``.npy``, loaded with
``allow_pickle=False``), ``docs.arrow`` (an Arrow IPC file with ``title``, ``text`` and, for
indexes built from files, ``id``; it can be memory-mapped) and ``turnrl_index.json``
(tokenizer settings). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import bm25s
import numpy as np
import pyarrow as pa

from env_workers.bm25_build import (  # noqa: F401 - re-exported: the index's building blocks
    DEFAULT_BATCH_SIZE,
    STOPWORDS,
    TOKEN_PATTERN,
    ScoreMatrixBuilder,
    TermEncoder,
    bm25s_retriever,
    count_corpus_rows,
    doc_text,
    iter_corpus_batches,
    make_stemmer,
    tokenize_bm25s,
    write_bm25s_meta,
)
from env_workers.corpus import CORPUS_COLUMNS, validate_corpus

logger = logging.getLogger(__name__)

META_FILE = "turnrl_index.json"
DOCS_FILE = "docs.arrow"
FORMAT_VERSION = 1
#: Longest query text looked at, in characters.
MAX_QUERY_CHARS = 2048


@dataclass(frozen=True)
class Hit:
    """One search result."""

    doc_index: int
    score: float
    title: str
    text: str


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
        self._stemmer = make_stemmer(stemmer_name)
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
        stem = make_stemmer(stemmer)
        stemmer_name = stemmer if stem is not None else None
        if out_dir is not None:
            return cls._build_into(table_or_path, Path(out_dir), stem, stemmer_name, k1, b, batch_size, mmap, progress)
        if isinstance(table_or_path, pa.Table):
            table = validate_corpus(table_or_path)
        else:
            table = pa.Table.from_batches(list(iter_corpus_batches(table_or_path, batch_size)))
        builder = ScoreMatrixBuilder(TermEncoder(stem))
        for batch in table.to_batches(max_chunksize=batch_size):
            titles = batch.column("title").to_pylist()
            texts = batch.column("text").to_pylist()
            builder.add([doc_text(t, x) for t, x in zip(titles, texts)])
            if progress is not None:
                progress(batch.num_rows)
        scores = builder.finish(k1, b)
        retriever = bm25s_retriever(scores, builder.encoder.vocab, k1, b)
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
        builder = ScoreMatrixBuilder(TermEncoder(stem), spill_dir=out / ".build-tmp")
        schema = pa.schema([(c, pa.string()) for c in CORPUS_COLUMNS])
        with pa.OSFile(str(out / DOCS_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                batch = pa.RecordBatch.from_arrays([batch.column(c) for c in CORPUS_COLUMNS], schema=schema)
                writer.write_batch(batch)
                titles = batch.column("title").to_pylist()
                texts = batch.column("text").to_pylist()
                builder.add([doc_text(t, x) for t, x in zip(titles, texts)])
                if progress is not None:
                    progress(batch.num_rows)
        if builder.num_docs == 0:
            raise ValueError(f"{source}: corpus is empty; expected rows with columns {list(CORPUS_COLUMNS)}")
        builder.finish(k1, b, out_dir=out, progress=progress)
        write_bm25s_meta(out, builder.encoder.vocab, k1, b, builder.num_docs)
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
        if stemmer_name is not None and make_stemmer(stemmer_name) is None:
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
        tokens = tokenize_bm25s(texts, self._stemmer) if texts else []
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
