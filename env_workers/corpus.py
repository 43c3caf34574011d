"""Corpus ingestion: a table of articles with columns ``id``, ``title``, ``text`` (all strings).

Read from Parquet (``.parquet``/``.pq``) or JSON Lines (``.jsonl``/``.json`` with one object
per line). :func:`read_hotpotqa` turns the HotpotQA distractor file (a JSON array, Hugging
Face column layout) into such a corpus plus question rows.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

CORPUS_COLUMNS: tuple[str, ...] = ("id", "title", "text")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _check_suffix(p: Path) -> str:
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + JSONL_SUFFIXES:
        raise ValueError(
            f"{p}: unknown file type {suffix!r}; expected one of {PARQUET_SUFFIXES + JSONL_SUFFIXES}"
        )
    return suffix


PEEK_BYTES = 1 << 20  # how much of a JSON file is read to find its first record


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path; ``FileNotFoundError`` naming it when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return p


def parquet_schema(p: Path) -> pa.Schema:
    """The Arrow schema of a Parquet file; ``ValueError`` naming the file when it is not one."""
    try:
        return pq.read_schema(p)
    except pa.ArrowException as exc:
        raise ValueError(f"{p}: could not read as parquet ({exc})") from exc


def first_json_record(p: Path) -> dict[str, Any] | None:
    """First object of a JSON Lines file or of a JSON array (``None`` if there is none)."""
    with p.open("r", encoding="utf-8", errors="replace") as f:
        head = f.read(PEEK_BYTES)
    s = head.lstrip()
    if not s:
        return None
    decoder = json.JSONDecoder()
    if s.startswith("["):
        body = s[1:].lstrip()
        if body.startswith("]"):
            return None
        try:
            obj, _ = decoder.raw_decode(body)
        except ValueError:
            # The first record is longer than the peek: parse the whole array.
            try:
                records = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{p}: invalid JSON ({exc})") from exc
            obj = records[0] if isinstance(records, list) and records else None
    else:
        line = s.split("\n", 1)[0]
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{p}: line 1 is not valid JSON ({exc})") from exc
    if obj is not None and not isinstance(obj, dict):
        raise ValueError(f"{p}: expected JSON objects, found {type(obj).__name__}")
    return obj


def open_parquet(p: Path, columns: Sequence[str], what: str = "") -> pq.ParquetFile:
    """Open ``p`` for streaming and check it holds ``columns``; ``ValueError`` naming the file otherwise.

    ``what`` prefixes the missing-columns message (e.g. ``"corpus is "``).
    """
    try:
        pf = pq.ParquetFile(p)
    except pa.ArrowException as exc:
        raise ValueError(f"{p}: could not read as parquet ({exc})") from exc
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{p}: {what}missing column(s) {missing}; expected columns {list(columns)}, "
                         f"found {pf.schema_arrow.names}")
    return pf


def read_json_records(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON Lines (one object per line) or one JSON array of objects.

    Raises ``ValueError`` naming the file (and line) for content that is not JSON objects.
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text ({exc})") from exc
    if raw.lstrip().startswith("["):
        try:
            records = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{p}: invalid JSON ({exc})") from exc
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{p}: expected a JSON array of objects")
        return records
    records = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(parse_jsonl_line(line, p, lineno))
    return records


def parse_jsonl_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One JSON Lines record as a dict; the error names the file and the line."""
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc})") from exc
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: line {lineno} is not a JSON object")
    return rec


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local Parquet or JSON Lines file as dicts (see :func:`read_table`)."""
    p = Path(path)
    if _check_suffix(p) in PARQUET_SUFFIXES:
        return read_table(p).to_pylist()
    return read_json_records(p)


def read_table(path: str | Path) -> pa.Table:
    """Read a Parquet or JSON Lines file into an Arrow table.

    A ``.json`` file that holds one JSON array of objects is read too. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file) for an
    unknown suffix or unreadable content.
    """
    p = Path(path)
    suffix = _check_suffix(p)
    try:
        if suffix in PARQUET_SUFFIXES:
            return pq.read_table(p)
        records = read_json_records(p)
        columns = list(dict.fromkeys(k for r in records for k in r))
        return pa.table({c: [r.get(c) for r in records] for c in columns})
    except pa.ArrowException as exc:
        raise ValueError(f"{p}: could not read as {suffix[1:]} ({exc})") from exc


def _as_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col.cast(pa.string()), "")


def load_corpus(path: str | Path) -> pa.Table:
    """Load a corpus table with exactly the columns ``id, title, text`` (strings).

    Nulls become empty strings; non-string ids are cast to strings. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the
    expected columns for an empty file or missing columns.
    """
    p = Path(path)
    if _check_suffix(p) in PARQUET_SUFFIXES:
        return validate_corpus(read_table(p), source=str(p))
    records = read_json_records(p)
    if not records:
        raise ValueError(f"{p}: corpus is empty; expected rows with columns {list(CORPUS_COLUMNS)}")
    found = list(dict.fromkeys(k for r in records for k in r))
    missing = [c for c in CORPUS_COLUMNS if c not in found]
    if missing:
        raise ValueError(
            f"{p}: corpus is missing column(s) {missing}; expected columns {list(CORPUS_COLUMNS)}, found {found}"
        )
    columns = {c: ["" if r.get(c) is None else str(r.get(c)) for r in records] for c in CORPUS_COLUMNS}
    return validate_corpus(pa.table(columns), source=str(p))


def validate_corpus(table: pa.Table, *, source: str = "<table>") -> pa.Table:
    """Check and normalise an in-memory corpus table (see :func:`load_corpus`)."""
    missing = [c for c in CORPUS_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{source}: corpus is missing column(s) {missing}; expected columns "
            f"{list(CORPUS_COLUMNS)}, found {table.column_names}"
        )
    if table.num_rows == 0:
        raise ValueError(f"{source}: corpus is empty; expected rows with columns {list(CORPUS_COLUMNS)}")
    try:
        cols = [_as_string(table.column(c)) for c in CORPUS_COLUMNS]
    except pa.ArrowException as exc:
        raise ValueError(
            f"{source}: columns {list(CORPUS_COLUMNS)} must be strings ({exc})"
        ) from exc
    return pa.Table.from_arrays(cols, names=list(CORPUS_COLUMNS))


def read_hotpotqa(path: str | Path) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Read a HotpotQA file (JSON array, HF layout) into ``(corpus, questions)``.

    Paragraph i of a question is ``context.title[i]`` with the joined
    ``context.sentences[i]``; paragraphs repeated across questions are kept once. HTML
    entities (``&amp;``) are unescaped in titles, text and answers. Each question row has
    ``question``, ``answers`` (one alias), ``entity`` (first supporting title), ``attribute``
    (the HotpotQA type), ``hops`` (number of distinct supporting titles) and ``chain``.

    HotpotQA: Yang et al., EMNLP 2018, CC BY-SA 4.0.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        with p.open("r", encoding="utf-8") as f:
            records = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a JSON array of HotpotQA records ({exc})") from exc
    if not isinstance(records, list):
        raise ValueError(f"{p}: expected a JSON array of HotpotQA records")
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: set[tuple[str, str]] = set()
    questions: list[dict[str, Any]] = []
    for qi, rec in enumerate(records):
        try:
            ctx = rec["context"]
            for title, sentences in zip(ctx["title"], ctx["sentences"]):
                t, body = html.unescape(title), html.unescape("".join(sentences)).strip()
                if (t, body) in seen:
                    continue
                seen.add((t, body))
                ids.append(f"hotpot-{len(ids)}")
                titles.append(t)
                texts.append(body)
            chain = list(dict.fromkeys(html.unescape(t) for t in rec["supporting_facts"]["title"]))
            questions.append(
                {
                    "question": rec["question"],
                    "answers": [html.unescape(rec["answer"])],
                    "entity": chain[0] if chain else "",
                    "attribute": rec.get("type", ""),
                    "hops": len(chain),
                    "chain": chain,
                }
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{p}: record {qi} is not a HotpotQA record ({exc!r})") from exc
    corpus = pa.table({"id": ids, "title": titles, "text": texts})
    logger.info("read %d paragraphs and %d questions from %s", len(ids), len(questions), p)
    return corpus, questions
