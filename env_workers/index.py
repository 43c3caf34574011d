"""BM25 index over a corpus table, built on ``bm25s``.

Documents are indexed as ``title + "\\n" + text``, lowercased, split on word characters,
English stopwords removed and (when PyStemmer is importable and asked for) Snowball-stemmed.

On disk (:meth:`BM25Index.save`) a directory holds the ``bm25s`` arrays (``.npy``, loaded with
``allow_pickle=False``), ``docs.arrow`` (an Arrow IPC file with ``title`` and ``text``; it can
be memory-mapped) and ``turnrl_index.json`` (tokenizer settings). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import bm25s
import numpy as np
import pyarrow as pa

from env_workers.corpus import load_corpus, validate_corpus

logger = logging.getLogger(__name__)

META_FILE = "turnrl_index.json"
DOCS_FILE = "docs.arrow"
FORMAT_VERSION = 1
STOPWORDS = "english"
#: Longest query text looked at, in characters.
MAX_QUERY_CHARS = 2048


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
    ) -> "BM25Index":
        """Index a corpus table (or a Parquet/JSONL file) with columns ``id, title, text``."""
        if isinstance(table_or_path, pa.Table):
            table = validate_corpus(table_or_path)
        else:
            table = load_corpus(table_or_path)
        stem = _make_stemmer(stemmer)
        stemmer_name = stemmer if stem is not None else None
        titles = table.column("title").to_pylist()
        texts = table.column("text").to_pylist()
        tokens = _tokenize([f"{t}\n{x}" for t, x in zip(titles, texts)], stem)
        retriever = bm25s.BM25(k1=k1, b=b, backend="numpy")
        retriever.index(tokens, show_progress=False)
        docs = pa.table({"title": table.column("title"), "text": table.column("text")})
        logger.info("built BM25 index over %d documents (%d terms)", len(titles), len(retriever.vocab_dict))
        return cls(retriever, docs, stemmer_name=stemmer_name, k1=k1, b=b)

    def save(self, directory: str | Path) -> Path:
        """Write the index into ``directory`` (created if needed); returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(d), show_progress=False)
        with pa.OSFile(str(d / DOCS_FILE), "wb") as sink:
            with pa.ipc.new_file(sink, self._docs.schema) as writer:
                writer.write_table(self._docs)
        meta = {
            "format_version": FORMAT_VERSION,
            "stemmer": self.stemmer_name,
            "stopwords": STOPWORDS,
            "k1": self.k1,
            "b": self.b,
            "num_docs": len(self),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        logger.info("saved BM25 index (%d documents) to %s", len(self), d)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> "BM25Index":
        """Open an index written by :meth:`save`; ``mmap=True`` memory-maps arrays and docs."""
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d}: not a turnrl BM25 index (no {META_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d}: index format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
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

    def doc(self, doc_index: int) -> tuple[str, str]:
        """``(title, text)`` of document ``doc_index``."""
        return self._titles[doc_index].as_py(), self._texts[doc_index].as_py()

    def query_tokens(self, query: str) -> list[str]:
        """The in-vocabulary terms a query is scored on (empty: the query cannot match)."""
        return self._query_tokens([query])[0]

    def _query_tokens(self, queries: Sequence[object]) -> list[list[str]]:
        texts = [q[:MAX_QUERY_CHARS] if isinstance(q, str) else "" for q in queries]
        tokens = _tokenize(texts, self._stemmer) if texts else []
        return [[t for t in toks if t in self._vocab] for toks in tokens]

    def search(self, queries: Sequence[str], k: int = 1) -> list[list[Hit]]:
        """Top-``k`` hits for each query, best first, in one ``bm25s`` call for the batch.

        A query with no indexed term (empty, all stopwords, unknown words, not a string) gets
        ``[]``; documents scoring 0 are never returned.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        results: list[list[Hit]] = [[] for _ in queries]
        tokens = self._query_tokens(queries)
        live = [i for i, toks in enumerate(tokens) if toks]
        if not live:
            return results
        kk = min(k, len(self))
        docs, scores = self._retriever.retrieve(
            [tokens[i] for i in live], k=kk, show_progress=False, n_threads=0, return_as="tuple"
        )
        docs, scores = np.asarray(docs), np.asarray(scores)
        for row, qi in enumerate(live):
            for doc_index, score in zip(docs[row].tolist(), scores[row].tolist()):
                if score <= 0.0:
                    continue
                title, text = self.doc(int(doc_index))
                results[qi].append(Hit(int(doc_index), float(score), title, text))
        return results
