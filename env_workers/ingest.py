"""Corpus ingestion: Wikipedia dumps in several layouts -> one normalised ``id, title, text`` Parquet.

Layouts (``layout="auto"`` picks one from the file name and its first record):

========== ==================================================================================
``jsonl``    JSON Lines (or a JSON array) of ``{"id", "title", "text"}`` objects
``parquet``  Parquet with columns ``id, title, text``
``dpr_tsv``  the DPR ``psgs_w100.tsv`` layout: tab-separated ``id  text  title`` with that
             header line, CSV quoting (Karpukhin et al. 2020, the 21M-passage 2018 split)
``kilt``     the KILT knowledge source (JSON Lines or Parquet): ``wikipedia_id``,
             ``wikipedia_title``, ``text`` = list of paragraphs (Petroni et al. 2021); the
             title paragraph and ``Section::::`` headings are dropped, ``BULLET::::-`` markers
             stripped, paragraphs joined by newlines (one passage per article before chunking)
``hotpotqa`` HotpotQA question records (JSON array or JSON Lines; Hugging Face column layout
             ``context: {title: [...], sentences: [[...]]}`` or the original
             ``context: [[title, [sentences]], ...]``); each context paragraph becomes a
             passage, repeats kept once, ids ``hotpot-<n>`` as :func:`env_workers.corpus.read_hotpotqa`.
             HotpotQA: Yang et al., EMNLP 2018, CC BY-SA 4.0.
========== ==================================================================================

Everything streams: sources are read in batches of ``batch_size`` records (Parquet and TSV
through Arrow readers, JSON Lines line by line), optionally cut into ``~chunk_words``-word
passages (:func:`chunk_text`), and written batch by batch with a ``pyarrow.parquet.ParquetWriter``;
only one batch is ever held as Python objects. The exception is a file that is one JSON array,
which ``json`` must parse whole (use JSON Lines for large files).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from env_workers.corpus import (
    CORPUS_COLUMNS,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    existing_file,
    first_json_record,
    open_parquet,
    parquet_schema,
    parse_jsonl_line,
)

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("jsonl", "parquet", "dpr_tsv", "kilt", "hotpotqa")
TSV_SUFFIXES = (".tsv",)
DPR_HEADER = ["id", "text", "title"]
KILT_KEYS = ("wikipedia_id", "wikipedia_title", "text")
DEFAULT_BATCH_SIZE = 20_000
#: How much of a JSON array is read to find its first record during layout detection.
_SCHEMA = pa.schema([(c, pa.string()) for c in CORPUS_COLUMNS])

#: ``(id, title, text)`` columns of one batch.
Columns = tuple[list[str], list[str], list[str]]


@dataclass
class IngestStats:
    """What :func:`ingest_corpus` read and wrote."""

    layout: str
    source_records: int = 0
    passages: int = 0
    skipped: int = 0
    """Records that held no passage (empty KILT article, repeated HotpotQA paragraph)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- detection


def _layout_from_keys(keys: set[str], p: Path) -> str:
    if set(KILT_KEYS) <= keys:
        return "kilt"
    if "context" in keys and "question" in keys:
        return "hotpotqa"
    if set(CORPUS_COLUMNS) <= keys:
        return "parquet" if p.suffix.lower() in PARQUET_SUFFIXES else "jsonl"
    raise ValueError(
        f"{p}: cannot tell the corpus layout from its fields {sorted(keys)}; expected "
        f"{list(CORPUS_COLUMNS)} (jsonl/parquet), {list(KILT_KEYS)} (kilt) or "
        "['question', 'context', ...] (hotpotqa)"
    )


def detect_layout(path: str | Path) -> str:
    """The layout of a corpus file (one of :data:`LAYOUTS`); ``ValueError`` naming the file."""
    p = existing_file(path)
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _layout_from_keys(set(parquet_schema(p).names), p)
    if suffix in TSV_SUFFIXES:
        with p.open("r", encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        if header == DPR_HEADER:
            return "dpr_tsv"
        raise ValueError(f"{p}: a .tsv corpus needs the DPR header {DPR_HEADER}, found {header}")
    if suffix in JSONL_SUFFIXES:
        first = first_json_record(p)
        if first is None:
            raise ValueError(f"{p}: corpus is empty; expected JSON records")
        return _layout_from_keys(set(first), p)
    raise ValueError(
        f"{p}: unknown corpus file type {suffix!r}; expected one of "
        f"{PARQUET_SUFFIXES + JSONL_SUFFIXES + TSV_SUFFIXES}"
    )


# --------------------------------------------------------------------------- readers


def _str(x: object) -> str:
    return "" if x is None else x if isinstance(x, str) else str(x)


def _iter_json_records(p: Path, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of objects from JSON Lines (streamed) or a JSON array (parsed whole)."""
    with p.open("r", encoding="utf-8") as f:
        first = ""
        while not first:
            ch = f.read(1)
            if not ch:
                return
            first = ch if not ch.isspace() else ""
    if first == "[":
        logger.warning("%s is one JSON array: it is parsed whole (JSON Lines would stream)", p)
        try:
            records = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p}: invalid JSON ({exc})") from exc
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{p}: expected a JSON array of objects")
        for i in range(0, len(records), batch_size):
            yield records[i : i + batch_size]
        return
    batch: list[dict[str, Any]] = []
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            batch.append(parse_jsonl_line(line, p, lineno))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def _iter_parquet_columns(p: Path, columns: list[str], batch_size: int) -> Iterator[dict[str, list[Any]]]:
    pf = open_parquet(p, columns)
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        yield {c: batch.column(c).to_pylist() for c in columns}


def _read_corpus_rows(p: Path, layout: str, batch_size: int, stats: IngestStats) -> Iterator[Columns]:
    if layout == "parquet":
        for cols in _iter_parquet_columns(p, list(CORPUS_COLUMNS), batch_size):
            stats.source_records += len(cols["id"])
            yield ([_str(x) for x in cols["id"]], [_str(x) for x in cols["title"]], [_str(x) for x in cols["text"]])
        return
    for recs in _iter_json_records(p, batch_size):
        missing = [c for c in CORPUS_COLUMNS if c not in recs[0]]
        if missing:
            raise ValueError(f"{p}: record lacks field(s) {missing}; expected {list(CORPUS_COLUMNS)}")
        stats.source_records += len(recs)
        yield ([_str(r.get("id")) for r in recs], [_str(r.get("title")) for r in recs],
               [_str(r.get("text")) for r in recs])


def _read_dpr_tsv(p: Path, batch_size: int, stats: IngestStats) -> Iterator[Columns]:
    with p.open("r", encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    if header != DPR_HEADER:
        raise ValueError(f"{p}: a DPR passages file needs the header {DPR_HEADER}, found {header}")
    read = pacsv.ReadOptions(block_size=1 << 24, use_threads=True)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char='"', double_quote=True, newlines_in_values=False)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in DPR_HEADER}, strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(p, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            for lo in range(0, batch.num_rows, batch_size):
                part = batch.slice(lo, batch_size)
                stats.source_records += part.num_rows
                yield (part.column("id").to_pylist(), part.column("title").to_pylist(),
                       part.column("text").to_pylist())
    except pa.ArrowException as exc:
        raise ValueError(f"{p}: not a DPR passages TSV (id, text, title) ({exc})") from exc


def kilt_article_text(title: str, paragraphs: object) -> str:
    """Plain text of a KILT article: title line, ``Section::::`` headings dropped, bullets unmarked."""
    if isinstance(paragraphs, str):
        paragraphs = [paragraphs]
    if not isinstance(paragraphs, list):
        return ""
    out: list[str] = []
    for i, para in enumerate(paragraphs):
        if not isinstance(para, str):
            continue
        s = para.strip()
        if not s or s.startswith("Section::::") or (i == 0 and s == title.strip()):
            continue
        if s.startswith("BULLET::::"):
            s = s[len("BULLET::::"):].lstrip("- ").strip()
        if s:
            out.append(s)
    return "\n".join(out)


def _read_kilt(p: Path, batch_size: int, stats: IngestStats) -> Iterator[Columns]:
    if p.suffix.lower() in PARQUET_SUFFIXES:
        batches: Iterator[list[dict[str, Any]]] = (
            [dict(zip(cols, vals)) for vals in zip(*(cols[c] for c in KILT_KEYS))]
            for cols in _iter_parquet_columns(p, list(KILT_KEYS), batch_size)
        )
    else:
        batches = _iter_json_records(p, batch_size)
    for recs in batches:
        stats.source_records += len(recs)
        ids, titles, texts = [], [], []
        for r in recs:
            if "wikipedia_title" not in r or "text" not in r:
                raise ValueError(f"{p}: KILT record lacks 'wikipedia_title'/'text' (found {sorted(r)})")
            title = _str(r.get("wikipedia_title"))
            text = kilt_article_text(title, r.get("text"))
            if not text:
                stats.skipped += 1
                continue
            ids.append(_str(r.get("wikipedia_id", r.get("_id"))))
            titles.append(title)
            texts.append(text)
        yield ids, titles, texts


def _hotpot_paragraphs(rec: dict[str, Any]) -> list[tuple[str, list[str]]]:
    ctx = rec["context"]
    if isinstance(ctx, dict):  # Hugging Face column layout
        return list(zip(ctx["title"], ctx["sentences"]))
    return [(pair[0], pair[1]) for pair in ctx]  # original layout: [[title, [sentences]], ...]


def _read_hotpotqa(p: Path, batch_size: int, stats: IngestStats) -> Iterator[Columns]:
    seen: set[bytes] = set()
    n = 0
    qi = 0
    for recs in _iter_json_records(p, batch_size):
        ids, titles, texts = [], [], []
        for rec in recs:
            try:
                paragraphs = _hotpot_paragraphs(rec)
            except (KeyError, TypeError, IndexError) as exc:
                raise ValueError(f"{p}: record {qi} is not a HotpotQA record ({exc!r})") from exc
            qi += 1
            stats.source_records += 1
            for title, sentences in paragraphs:
                t = html.unescape(_str(title))
                body = html.unescape("".join(s for s in sentences if isinstance(s, str))).strip()
                key = hashlib.blake2b(f"{t}\x00{body}".encode("utf-8"), digest_size=16).digest()
                if key in seen:
                    stats.skipped += 1
                    continue
                seen.add(key)
                ids.append(f"hotpot-{n}")
                titles.append(t)
                texts.append(body)
                n += 1
        yield ids, titles, texts


def iter_source(path: str | Path, layout: str = "auto", *, batch_size: int = DEFAULT_BATCH_SIZE,
                stats: IngestStats | None = None) -> Iterator[Columns]:
    """``(ids, titles, texts)`` batches of a corpus file in any of :data:`LAYOUTS` (not chunked)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if layout == "auto":
        layout = detect_layout(p)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown corpus layout {layout!r}; expected 'auto' or one of {list(LAYOUTS)}")
    stats = stats if stats is not None else IngestStats(layout)
    if layout in ("jsonl", "parquet"):
        yield from _read_corpus_rows(p, layout, batch_size, stats)
    elif layout == "dpr_tsv":
        yield from _read_dpr_tsv(p, batch_size, stats)
    elif layout == "kilt":
        yield from _read_kilt(p, batch_size, stats)
    else:
        yield from _read_hotpotqa(p, batch_size, stats)


# --------------------------------------------------------------------------- chunking


def chunk_text(text: str, chunk_words: int) -> list[str]:
    """Cut ``text`` into passages of ``chunk_words`` whitespace-separated words.

    A text of at most ``chunk_words`` words comes back unchanged (one passage). Otherwise
    the words are re-joined with single spaces in windows of ``chunk_words``; a last window
    shorter than half a passage is appended to the one before, so every passage has between
    ``chunk_words // 2`` and ``1.5 * chunk_words`` words (DPR uses 100-word windows).
    """
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be >= 1, got {chunk_words}")
    words = text.split()
    if len(words) <= chunk_words:
        return [text]
    windows = [words[i : i + chunk_words] for i in range(0, len(words), chunk_words)]
    if len(windows) > 1 and len(windows[-1]) < chunk_words // 2:
        tail = windows.pop()
        windows[-1] = windows[-1] + tail
    return [" ".join(w) for w in windows]


def _chunk_columns(cols: Columns, chunk_words: int | None) -> Columns:
    if not chunk_words:
        return cols
    ids, titles, texts = [], [], []
    for doc_id, title, text in zip(*cols):
        pieces = chunk_text(text, chunk_words)
        if len(pieces) == 1:
            ids.append(doc_id)
            titles.append(title)
            texts.append(pieces[0])
            continue
        for k, piece in enumerate(pieces):
            ids.append(f"{doc_id}#{k}")
            titles.append(title)
            texts.append(piece)
    return ids, titles, texts


# --------------------------------------------------------------------------- ingest


def ingest_corpus(
    input_path: str | Path,
    output_path: str | Path,
    *,
    layout: str = "auto",
    chunk_words: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> IngestStats:
    """Stream a corpus file into a normalised Parquet (``id, title, text`` strings).

    ``chunk_words`` (``None``/0: off) cuts long texts into ~N-word passages (see
    :func:`chunk_text`; a cut passage gets id ``<id>#<k>``). ``progress(records, passages)``
    is called after every batch with that batch's counts. Raises ``FileNotFoundError`` /
    ``ValueError`` naming the file and what was expected; the output is only left behind
    when ingestion succeeds.
    """
    src, out = Path(input_path), Path(output_path)
    if chunk_words is not None and chunk_words < 0:
        raise ValueError(f"chunk_words must be >= 0, got {chunk_words}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolved = detect_layout(src) if layout == "auto" else layout
    if resolved not in LAYOUTS:
        raise ValueError(f"unknown corpus layout {layout!r}; expected 'auto' or one of {list(LAYOUTS)}")
    stats = IngestStats(resolved)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        with pq.ParquetWriter(tmp, _SCHEMA, compression="zstd") as writer:
            seen_records = 0
            for cols in iter_source(src, resolved, batch_size=batch_size, stats=stats):
                records, seen_records = stats.source_records - seen_records, stats.source_records
                ids, titles, texts = _chunk_columns(cols, chunk_words)
                if ids:
                    writer.write_batch(pa.RecordBatch.from_arrays(
                        [pa.array(ids, pa.string()), pa.array(titles, pa.string()), pa.array(texts, pa.string())],
                        schema=_SCHEMA,
                    ))
                stats.passages += len(ids)
                if progress is not None:
                    progress(records, len(ids))
        if stats.passages == 0:
            raise ValueError(f"{src}: no passages found (layout {resolved!r}); the corpus is empty")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - t0
    logger.info("ingested %s (%s): %d records -> %d passages in %s (%.1fs)",
                src, resolved, stats.source_records, stats.passages, out, stats.seconds)
    return stats


def build_index_from_source(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "auto",
    chunk_words: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stemmer: str | None = "english",
    k1: float = 1.5,
    b: float = 0.75,
    show_progress: bool = True,
) -> tuple[Any, IngestStats]:
    """Ingest ``input_path`` into ``out_dir/corpus.parquet`` and build the BM25 index in ``out_dir``.

    Returns ``(BM25Index loaded with mmap, IngestStats)``; tqdm progress bars when
    ``show_progress``.
    """
    from tqdm.auto import tqdm

    from env_workers.index import BM25Index

    out = Path(out_dir)
    corpus_path = out / "corpus.parquet"
    with tqdm(desc="ingest", unit="rec", disable=not show_progress, dynamic_ncols=True) as bar:
        stats_passages = 0

        def tick(records: int, passages: int) -> None:
            nonlocal stats_passages
            stats_passages += passages
            bar.update(records)
            bar.set_postfix_str(f"{stats_passages} passages", refresh=False)

        stats = ingest_corpus(input_path, corpus_path, layout=layout, chunk_words=chunk_words,
                              batch_size=batch_size, progress=tick)
    with tqdm(total=2 * stats.passages, desc="index", unit="doc", disable=not show_progress,
              dynamic_ncols=True) as bar:
        index = BM25Index.build(corpus_path, out_dir=out, stemmer=stemmer, k1=k1, b=b,
                                batch_size=batch_size, progress=bar.update)
    return index, stats
