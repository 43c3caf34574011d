"""Question files in public QA layouts, read through ``datasets`` and mapped to ``question, answers``.

Layouts (``layout="auto"`` looks at the first record / the Parquet schema):

============ ======================================================================================
``turnrl``     this project's own rows: ``question``, ``answers`` (list or string), optional
               ``entity, attribute, hops, chain`` (read by :func:`env_workers.demo_data.load_questions`)
``triviaqa``   TriviaQA ``rc`` as on the Hugging Face hub: ``question``, ``answer: {value,
               aliases, normalized_aliases, ...}`` (Joshi et al. 2017); answers = value, aliases and
               normalised aliases, in that order, repeats dropped
``nq_open``    NQ-open: ``question``, ``answer: [str, ...]`` (Lee et al. 2019; Kwiatkowski et al. 2019)
``hotpotqa``   HotpotQA: ``question``, ``answer: str``, ``type``, ``supporting_facts: {title,
               sent_id}`` (Yang et al. 2018, CC BY-SA 4.0); rows also get ``entity`` (first
               supporting title), ``attribute`` (the type), ``hops`` (distinct supporting titles)
               and ``chain`` (those titles), as :func:`env_workers.corpus.read_hotpotqa`
============ ======================================================================================

Files are local Parquet, JSON Lines or JSON arrays, loaded with
``datasets.load_dataset("json"|"parquet", data_files=..., cache_dir=<temporary directory>)``:
no hub access. HTML entities in HotpotQA answers are unescaped (the corpus side does the same).
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from env_workers.corpus import JSONL_SUFFIXES, PARQUET_SUFFIXES, existing_file, first_json_record, parquet_schema

logger = logging.getLogger(__name__)

QUESTION_LAYOUTS: tuple[str, ...] = ("turnrl", "triviaqa", "nq_open", "hotpotqa")
#: Columns each external layout needs (everything else is dropped before rows become Python).
_WANTED: dict[str, tuple[str, ...]] = {
    "triviaqa": ("question", "answer", "question_id"),
    "nq_open": ("question", "answer", "id"),
    "hotpotqa": ("question", "answer", "type", "supporting_facts", "id", "_id"),
}


def _layout_from_answer(answer: object) -> str | None:
    if isinstance(answer, dict):
        return "triviaqa" if {"aliases", "normalized_aliases", "value"} & set(answer) else None
    if isinstance(answer, list):
        return "nq_open"
    if isinstance(answer, str):
        return "hotpotqa"
    return None


def _arrow_answer_layout(t: pa.DataType) -> str | None:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return "triviaqa" if {"aliases", "normalized_aliases", "value"} & names else None
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "nq_open"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "hotpotqa"
    return None


def detect_question_layout(path: str | Path) -> str:
    """The layout of a question file (one of :data:`QUESTION_LAYOUTS`).

    A file with an ``answers`` field, or without both ``question`` and ``answer``, counts as
    ``turnrl`` (whose reader then names what is missing).
    """
    p = existing_file(path)
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        schema = parquet_schema(p)
        if "answers" in schema.names or "question" not in schema.names or "answer" not in schema.names:
            return "turnrl"
        layout = _arrow_answer_layout(schema.field("answer").type)
    elif suffix in JSONL_SUFFIXES:
        first = first_json_record(p)
        if first is None or "answers" in first or "question" not in first or "answer" not in first:
            return "turnrl"
        layout = _layout_from_answer(first["answer"])
    else:
        raise ValueError(
            f"{p}: unknown question file type {suffix!r}; expected one of {PARQUET_SUFFIXES + JSONL_SUFFIXES}"
        )
    if layout is None:
        raise ValueError(
            f"{p}: cannot tell the question layout from its 'answer' field; expected a dict with "
            "value/aliases/normalized_aliases (triviaqa), a list of strings (nq_open) or a string (hotpotqa)"
        )
    return layout


def _dedupe(items: Iterable[object]) -> list[str]:
    out: list[str] = []
    for a in items:
        if isinstance(a, str) and a.strip() and a not in out:
            out.append(a)
    return out


def _map_row(layout: str, r: dict[str, Any]) -> dict[str, Any]:
    """One external record -> a ``question, answers, ...`` row (``ValueError`` for a bad record)."""
    q = r.get("question")
    if not isinstance(q, str):
        raise ValueError("needs a string 'question'")
    ans = r.get("answer")
    if layout == "triviaqa":
        if not isinstance(ans, dict):
            raise ValueError("needs an 'answer' object with value/aliases/normalized_aliases")
        answers = _dedupe([ans.get("value")] + list(ans.get("aliases") or []) + list(ans.get("normalized_aliases") or []))
        row: dict[str, Any] = {"question": q, "answers": answers, "hops": 1}
        if r.get("question_id") is not None:
            row["question_id"] = str(r["question_id"])
        return row
    if layout == "nq_open":
        if not isinstance(ans, list):
            raise ValueError("needs an 'answer' list of strings")
        row = {"question": q, "answers": _dedupe(ans), "hops": 1}
        if r.get("id") is not None:
            row["question_id"] = str(r["id"])
        return row
    if not isinstance(ans, str):
        raise ValueError("needs a string 'answer'")
    facts = r.get("supporting_facts") or {}
    titles = facts.get("title", []) if isinstance(facts, dict) else [f[0] for f in facts if f]
    chain = list(dict.fromkeys(html.unescape(t) for t in titles if isinstance(t, str)))
    row = {
        "question": q,
        "answers": [html.unescape(ans)],
        "entity": chain[0] if chain else "",
        "attribute": r.get("type") or "",
        "hops": max(1, len(chain)),
        "chain": chain,
    }
    qid = r.get("id", r.get("_id"))
    if qid is not None:
        row["question_id"] = str(qid)
    return row


def load_external_questions(
    path: str | Path, layout: str, *, max_hops: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Rows ``question, answers, ...`` of a TriviaQA / NQ-open / HotpotQA file, via ``datasets``.

    Rows with no usable answer are dropped (logged); ``max_hops``/``limit`` as in
    :func:`env_workers.demo_data.load_questions`. Raises ``FileNotFoundError``/``ValueError``
    naming the file, the record and what was expected.
    """
    if layout not in _WANTED:
        raise ValueError(f"unknown question layout {layout!r}; expected one of {list(_WANTED)}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    import datasets

    builder = "parquet" if p.suffix.lower() in PARQUET_SUFFIXES else "json"
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    rows: list[dict[str, Any]] = []
    dropped = 0
    try:
        with tempfile.TemporaryDirectory(prefix="turnrl-datasets-") as cache:
            try:
                ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache)
            except Exception as exc:  # noqa: BLE001 - datasets raises many types; name the file
                raise ValueError(f"{p}: could not read as {builder} question file ({type(exc).__name__}: {exc})") from exc
            missing = [c for c in ("question", "answer") if c not in ds.column_names]
            if missing:
                raise ValueError(
                    f"{p}: {layout} question file is missing column(s) {missing}; found {ds.column_names}"
                )
            ds = ds.select_columns([c for c in _WANTED[layout] if c in ds.column_names])
            for i, rec in enumerate(ds):
                try:
                    row = _map_row(layout, rec)
                except (ValueError, TypeError, AttributeError, IndexError) as exc:
                    raise ValueError(f"{p}: record {i} is not a {layout} question ({exc})") from exc
                if not row["answers"]:
                    dropped += 1
                    continue
                if max_hops is not None and int(row.get("hops") or 1) > max_hops:
                    continue
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
            del ds
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if dropped:
        logger.warning("%s: dropped %d question(s) without an answer", p, dropped)
    logger.info("read %d %s questions from %s", len(rows), layout, p)
    return rows


def write_questions_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write question rows as JSON Lines (the ``turnrl`` layout); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
