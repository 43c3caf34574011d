"""Shared fixtures: one default-size demo encyclopedia and its BM25 index per test session,
and the suite's local Ray for the tests that need real actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from env_workers.demo_data import generate_demo_data
from env_workers.index import BM25Index

HOTPOTQA_PATH = Path("/work/shared/data/hotpotqa_dev_distractor_100.json")


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo data at the default size (4000 people), seed 0."""
    return generate_demo_data(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def demo_corpus_rows(demo_paths: dict[str, Path]) -> list[dict]:
    return pq.read_table(demo_paths["corpus"]).to_pylist()


@pytest.fixture(scope="session")
def demo_index(demo_paths: dict[str, Path]) -> BM25Index:
    return BM25Index.build(demo_paths["corpus"])


@pytest.fixture(scope="session")
def demo_index_dir(demo_index: BM25Index, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_index.save(tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="session")
def ray_session(ray_local: Any) -> Any:
    """The suite's local Ray (tests/conftest.py ``ray_local``), shared with the other packages."""
    return ray_local
