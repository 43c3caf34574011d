"""Shared fixtures: tiny models, tokenizers and data built on the spot (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
# The device the engine tests run on: "cpu" here and in CI; `TURNRL_TEST_DEVICE=cuda` runs the same
# engine tests on a GPU (tests/gpu_checks.sh does, with the `gpu`-marked tests).
TEST_DEVICE = os.environ.get("TURNRL_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def device() -> str:
    """``TURNRL_TEST_DEVICE`` (default "cpu"); a CUDA device without CUDA skips the test."""
    if TEST_DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"TURNRL_TEST_DEVICE={TEST_DEVICE} but no CUDA device")
    return TEST_DEVICE


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2 + BPE tokenizer saved with save_pretrained."""
    from common.modeling import build_demo_model, train_demo_tokenizer

    out = tmp_path_factory.mktemp("tiny_policy")
    texts = [
        "Karo Velmin is a baker from Ralomek. Karo Velmin was born in 1873.",
        '<reasoning>I should search.</reasoning><tool>{"name": "wiki_search", "args": {"query": "Karo"}}</tool>',
        "Where is Karo Velmin from? The answer is Ralomek.",
    ] * 20
    tok = train_demo_tokenizer(texts, 300, out)
    model = build_demo_model(len(tok), hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                           "PYTHONPATH": str(REPO)}})
    yield ray
