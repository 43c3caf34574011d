"""``turnrl index build``: ingest a Wikipedia dump and build its BM25 index (argparse side only).

``learner.cli`` mounts :func:`add_index_arguments` as the ``index`` subcommand and calls
:func:`run_index`; heavy imports happen inside :func:`run_index`.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)

_LAYOUT_CHOICES = ("auto", "jsonl", "parquet", "dpr_tsv", "kilt", "hotpotqa")


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``index`` subcommands (``build``) to ``parser``."""
    sub = parser.add_subparsers(dest="index_command", required=True)
    b = sub.add_parser(
        "build",
        help="ingest a corpus file and build its BM25 index",
        description="Normalise a corpus (JSONL/Parquet id,title,text; DPR psgs_w100.tsv; KILT JSONL; "
        "HotpotQA) into DIR/corpus.parquet and build the BM25 index in DIR (load it with "
        "BM25Index.load(DIR, mmap=True)).",
    )
    b.add_argument("--input", required=True, help="corpus file")
    b.add_argument("--layout", default="auto", choices=_LAYOUT_CHOICES, help="input layout (default: detect)")
    b.add_argument("--chunk-words", type=int, default=0,
                   help="cut texts into ~N-word passages (0: keep them whole; DPR used 100)")
    b.add_argument("--out", required=True, help="output directory (corpus.parquet + index files)")
    b.add_argument("--batch-size", type=int, default=20_000, help="records per batch (bounds memory)")
    b.add_argument("--no-stem", action="store_true", help="index without Snowball stemming")
    b.add_argument("--k1", type=float, default=1.5, help="BM25 k1")
    b.add_argument("--b", type=float, default=0.75, help="BM25 b")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_index(args: argparse.Namespace) -> int:
    """Run an ``index`` subcommand; returns the exit status (2 for bad input, naming the file)."""
    from env_workers.ingest import build_index_from_source

    if args.index_command != "build":  # pragma: no cover - argparse enforces the choice
        return 1
    if args.chunk_words < 0 or args.batch_size < 1:
        print("turnrl: --chunk-words must be >= 0 and --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        index, stats = build_index_from_source(
            args.input, args.out, layout=args.layout, chunk_words=args.chunk_words or None,
            batch_size=args.batch_size, stemmer=None if args.no_stem else "english",
            k1=args.k1, b=args.b, show_progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"turnrl: {e}", file=sys.stderr)
        return 2
    logger.info("index ready in %s: %d passages from %d %s records", args.out, len(index),
                stats.source_records, stats.layout)
    return 0
