"""A synthetic, Wikipedia-sized passage corpus for benchmarks (no download, deterministic).

Words are made-up syllable strings; their frequencies follow a Zipf law (exponent ~1.1, as
natural text), so BM25 posting lists have the skew of a real corpus: a few very long lists
(common words) and a long tail of short ones. Each passage has a title of two rare words and
a body of ``words_per_passage`` +- 40 % words. Written with a ``ParquetWriter`` in batches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]


def make_vocabulary(size: int, seed: int = 0) -> list[str]:
    """``size`` distinct pseudo-words of 2-4 syllables (lowercase ASCII letters)."""
    rng = np.random.default_rng(seed)
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        n = size - len(words) + 64
        lengths = rng.integers(2, 5, size=n).tolist()
        picks = rng.integers(len(syllables), size=(n, 4)).tolist()
        for k, row in zip(lengths, picks):
            w = "".join(syllables[j] for j in row[:k])
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == size:
                    break
    return words


def write_synthetic_corpus(
    path: str | Path,
    num_passages: int,
    *,
    words_per_passage: int = 100,
    vocab_size: int = 200_000,
    zipf_exponent: float = 1.1,
    seed: int = 0,
    batch_size: int = 50_000,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``num_passages`` passages (``id, title, text``) to a Parquet file; returns the path."""
    if num_passages < 1 or words_per_passage < 1 or vocab_size < 10:
        raise ValueError("num_passages >= 1, words_per_passage >= 1 and vocab_size >= 10 are required")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    vocab = np.array(make_vocabulary(vocab_size, seed), dtype=object)
    rng = np.random.default_rng(seed + 1)
    weights = 1.0 / np.arange(1, vocab_size + 1, dtype=np.float64) ** zipf_exponent
    cdf = np.cumsum(weights / weights.sum())
    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    lo_len, hi_len = max(1, int(words_per_passage * 0.6)), int(words_per_passage * 1.4) + 1
    tmp = p.with_name(p.name + ".partial")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, num_passages, batch_size):
            n = min(batch_size, num_passages - start)
            lengths = rng.integers(lo_len, hi_len, size=n)
            flat = np.searchsorted(cdf, rng.random(int(lengths.sum())), side="right").clip(max=vocab_size - 1)
            words = vocab[flat].tolist()
            ends = np.cumsum(lengths).tolist()
            texts = [" ".join(words[e - k : e]) for e, k in zip(ends, lengths.tolist())]
            title_ids = rng.integers(vocab_size // 2, vocab_size, size=(n, 2))
            titles = [f"{vocab[a].capitalize()} {vocab[b].capitalize()}" for a, b in title_ids.tolist()]
            ids = [str(start + i) for i in range(n)]
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(ids, pa.string()), pa.array(titles, pa.string()), pa.array(texts, pa.string())], schema=schema))
            if progress is not None:
                progress(n)
    tmp.replace(p)
    logger.info("wrote %d synthetic passages to %s", num_passages, p)
    return p
