"""Generator worker: a Ray actor hosting one decoding engine.

Weights arrive versioned, in buckets (lists of object refs to state-dict slices),
and are applied between ``generate`` calls, so no in-flight sequence ever mixes
two versions. Every output records the version that produced it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from actors.engine import GenerationOutput, HFEngine, SamplingParams
from common.modeling import load_model, load_tokenizer

log = logging.getLogger(__name__)


class Generator:
    """Plain class; the driver wraps it with ``ray.remote``."""

    def __init__(self, model_path: str, *, dtype: str = "float32", torch_threads: int = 1,
                 backend: str = "hf", weight_store: Any = None):
        torch.set_num_threads(max(1, torch_threads))
        if backend != "hf":
            raise ValueError(f"generators.backend {backend!r}: only 'hf' is available in this build")
        self.tokenizer = load_tokenizer(model_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = HFEngine(load_model(model_path, dtype), self.tokenizer, device=device)
        self.weight_store = weight_store
        if weight_store is not None:  # restarted after a crash: catch up with the latest weights
            import ray

            latest = ray.get(weight_store.latest.remote())
            if latest is not None:
                version, refs = latest
                self.update_weights(version, refs)
                log.info("generator restarted at weight version %d", version)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[GenerationOutput]:
        return self.engine.generate(prompts, params, max_new_tokens)

    def update_weights(self, version: int, buckets: list[Any]) -> int:
        """Apply weight buckets (dicts of tensors or object refs to them) and set ``version``."""
        import ray

        for bucket in buckets:
            state = ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket
            self.engine.load_state_dict(state, version)
        self.engine.version = version
        return version

    def version(self) -> int:
        return self.engine.version

    def ping(self) -> bool:
        return True


class WeightStore:
    """Holds the object refs of the latest pushed weights so restarted generators can reload."""

    def __init__(self) -> None:
        self._latest: tuple[int, list[Any]] | None = None

    def publish(self, version: int, buckets: list[Any]) -> None:
        self._latest = (version, buckets)

    def latest(self) -> tuple[int, list[Any]] | None:
        return self._latest


def bucketize(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into buckets of at most ``bucket_bytes`` (a tensor never splits)."""
    buckets: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append({})
            size = 0
        buckets[-1][name] = t
        size += nbytes
    return buckets
