"""Make sure the corpus, questions and BM25 index exist and are valid, before Ray starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from env_workers.demo_data import DEMO_DATA_VERSION, generate_demo_data, load_questions
from env_workers.index import BM25Index
from env_workers.ingest import build_index_from_source, detect_layout

log = logging.getLogger(__name__)


@dataclass
class DataPaths:
    corpus: Path
    train: Path
    eval: Path
    index_dir: Path


def prepare_data(dcfg) -> DataPaths:
    """Generate the demo data (if ``kind: demo`` and absent), validate files, build the index.

    Every failure names the file and what was expected (``FileNotFoundError`` / ``ValueError``).
    """

    root = Path(dcfg.dir)
    if dcfg.kind == "demo":
        marker = root / f".demo-v{DEMO_DATA_VERSION}-{dcfg.seed}-{dcfg.num_people}-{dcfg.num_cities}-{dcfg.num_countries}-{dcfg.eval_fraction}"
        if not marker.exists():
            generate_demo_data(root, seed=dcfg.seed, num_people=dcfg.num_people, num_cities=dcfg.num_cities,
                               num_countries=dcfg.num_countries, eval_fraction=dcfg.eval_fraction)
            for old in root.glob(".demo-*"):
                old.unlink()
            index_dir = root / "index"
            if index_dir.exists():
                import shutil

                shutil.rmtree(index_dir)
            marker.touch()
        paths = DataPaths(root / "corpus.parquet", root / "train.parquet", root / "eval.parquet", root / "index")
    else:
        corpus = Path(dcfg.corpus_path)
        paths = DataPaths(corpus, Path(dcfg.train_path), Path(dcfg.eval_path), root / "index")
    for split in (paths.train, paths.eval):  # fail early on a missing/wrong-layout question file
        if not load_questions(split, limit=1):
            raise ValueError(f"question file {str(split)!r} holds no questions (expected columns question, answers)")
    try:
        check_index_files(paths.index_dir)
        BM25Index.load(paths.index_dir)  # validates a saved index
    except FileNotFoundError:
        _build_index(paths.corpus, paths.index_dir)
    except (ValueError, OSError, EOFError) as e:  # a damaged index: say which file, never rebuild over it silently
        raise ValueError(f"BM25 index {str(paths.index_dir)!r} is damaged: {e}. Expected the files written by "
                         f"BM25Index.save; delete the directory to rebuild it from {str(paths.corpus)!r}") from None
    return paths


def check_index_files(index_dir: Path) -> None:
    """Open every file of a saved index once (JSON parses, ``.npy`` headers and sizes, the Arrow docs file);
    ``ValueError`` naming the first damaged file. A missing index (no metadata file) is left to the caller."""
    import json

    import numpy as np
    import pyarrow as pa

    d = Path(index_dir)
    if not d.is_dir() or not any(d.glob("*.json")):
        return
    for f in sorted(d.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".npy":
                np.load(f, mmap_mode="r")
            elif f.suffix == ".arrow":
                with pa.memory_map(str(f), "r") as src:
                    pa.ipc.open_file(src).schema  # noqa: B018 - reads the footer
        except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(f)!r} is unreadable ({type(e).__name__}: {e})") from None


def _build_index(corpus_path: Path, index_dir: Path) -> None:
    """Index ``corpus_path`` into ``index_dir``: an ``id, title, text`` Parquet/JSONL file directly
    (Parquet streamed in batches), any other layout of :mod:`env_workers.ingest` (DPR TSV, KILT,
    HotpotQA) through ingestion into ``index_dir/corpus.parquet`` first."""

    layout = detect_layout(corpus_path)
    log.info("building BM25 index over %s (%s layout) -> %s", corpus_path, layout, index_dir)
    if layout in ("jsonl", "parquet"):
        BM25Index.build(corpus_path, out_dir=index_dir)
    else:
        build_index_from_source(corpus_path, index_dir, layout=layout, show_progress=False)
