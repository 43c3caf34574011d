"""Generator worker: a Ray actor hosting one decoding engine.

Weights arrive versioned, in buckets (lists of object refs to state-dict slices or
:class:`actors.weights.PackedBucket` byte buffers, or through a torch.distributed
broadcast), and are applied between decode steps at a turn boundary, so no turn ever
mixes two versions. Every output records the version that produced it.

Two generation interfaces:

* ``generate(prompts, params, max_new_tokens)`` -- stateless batches, every prompt
  prefilled in full (the original path).
* ``generate_turns(requests, release)`` -- the session path: requests carry a session
  id (one per episode) and the full token history; the engine keeps each session's
  KV cache between turns, so only new tokens are prefilled. ``submit`` / ``poll``
  expose the same scheduler without blocking (turns of other episodes may join the
  running batch while earlier ones decode).

Crash recovery: Ray restarts a dead generator (``max_restarts``); the constructor
reloads the latest published weights from the :class:`WeightStore` before the actor
serves anything. Sessions held by the dead process are gone; the next request of
each session carries its full history and is simply prefilled again.
``instance_id`` changes with every (re)start so callers can tell.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import torch

from actors.engine import GenerationOutput, HFEngine, Request, SamplingParams
from actors.weights import PackedBucket, WeightGroup
from common.modeling import load_model, load_tokenizer

log = logging.getLogger(__name__)


class Generator:
    """Plain class; the driver wraps it with ``ray.remote``."""

    def __init__(self, model_path: str, *, dtype: str = "float32", torch_threads: int = 1,
                 backend: str = "hf", weight_store: Any = None, kv_budget_tokens: int = 262144,
                 keep_kv_across_versions: bool = False, max_prefill_tokens: int = 8192,
                 vllm_kwargs: dict | None = None):
        torch.set_num_threads(max(1, torch_threads))
        self.tokenizer = load_tokenizer(model_path)
        self._instance = uuid.uuid4().hex
        if backend == "hf":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.engine = HFEngine(load_model(model_path, dtype), self.tokenizer, device=device,
                                   kv_budget_tokens=kv_budget_tokens,
                                   keep_kv_across_versions=keep_kv_across_versions,
                                   max_prefill_tokens=max_prefill_tokens)
        elif backend == "vllm":
            from actors.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path, self.tokenizer, dtype=dtype,
                                     keep_kv_across_versions=keep_kv_across_versions, **(vllm_kwargs or {}))
        else:
            raise ValueError(f"generators.backend {backend!r}: must be 'hf' or 'vllm'")
        self.weight_store = weight_store
        self._group: WeightGroup | None = None
        if weight_store is not None:  # restarted after a crash: catch up with the latest weights
            import ray

            latest = ray.get(weight_store.latest.remote())
            if latest is not None:
                version, refs = latest
                self.update_weights(version, refs)
                log.info("generator started at weight version %d", version)

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[GenerationOutput]:
        return self.engine.generate(prompts, params, max_new_tokens)

    def generate_turns(self, requests: list[Request], release: list[str] | None = None) -> list[GenerationOutput]:
        """Run these turns to completion (continuous batching, KV reused across turns).

        ``release``: sessions whose episodes ended; their caches are freed first.
        """
        if release:
            self.engine.free(release)
        return self.engine.generate_turns(requests)

    def submit(self, requests: list[Request], release: list[str] | None = None) -> str:
        """Queue turns without waiting; returns this process's ``instance_id``."""
        if release:
            self.engine.free(release)
        self.engine.submit(requests)
        return self._instance

    def poll(self, max_steps: int = 64) -> tuple[str, list[GenerationOutput]]:
        """Run scheduler steps until some turn finishes (or ``max_steps``); return (instance_id, finished)."""
        done: list[GenerationOutput] = []
        for _ in range(max_steps):
            if not self.engine.has_work():
                break
            done += self.engine.step()
            if done:
                break
        return self._instance, done

    def free_sessions(self, session_ids: list[str]) -> None:
        self.engine.free(session_ids)

    # -- weights ------------------------------------------------------------------------
    def update_weights(self, version: int, buckets: list[Any]) -> int:
        """Apply weight buckets (dicts of tensors, PackedBuckets, or object refs to them).

        Applied now when no turn is running, else staged until the running turns end
        (see :meth:`HFEngine.update_weights`). Returns ``version``.
        """
        import ray

        states = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in buckets]
        self.engine.update_weights(states, version)
        return version

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl") -> int:
        """Join the learner's weight-broadcast group (rank 0 = learner). Blocks until all joined."""
        if hasattr(self.engine, "init_weight_group"):  # vllm: the group lives in vLLM's worker process
            return self.engine.init_weight_group(host, port, rank, world_size)
        self._group = WeightGroup(host, port, rank, world_size, backend=backend)
        return rank

    def receive_weights(self, version: int, plans: list[PackedBucket]) -> int:
        """Receive a broadcast (the learner calls ``WeightGroup.send`` at the same time) and apply it."""
        if hasattr(self.engine, "receive_weights"):
            return self.engine.receive_weights(plans, version)
        if self._group is None:
            raise RuntimeError("init_weight_group first")
        buckets = self._group.recv(plans)
        self.engine.update_weights(buckets, version)
        return version

    def version(self) -> int:
        return self.engine.version

    def instance_id(self) -> str:
        return self._instance

    def stats(self) -> dict[str, Any]:
        s = dict(self.engine.session_stats()) if hasattr(self.engine, "session_stats") else {}
        s.update(version=self.engine.version, instance_id=self._instance)
        return s

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
