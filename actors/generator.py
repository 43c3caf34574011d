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
serves anything: the object-store buckets of the latest push, or, when weights travel
by broadcast (the store then holds only the version), a copy exported by a live peer
generator (``export_weights``). Sessions held by the dead process are gone; the next
request of each session carries its full history and is simply prefilled again.
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
                 keep_kv_across_versions: bool = False, max_prefill_tokens: int = 8192, lean_forward: bool = True,
                 cuda_graphs: bool = False, vllm_kwargs: dict | None = None):
        torch.set_num_threads(max(1, torch_threads))
        self.tokenizer = load_tokenizer(model_path)
        self._instance = uuid.uuid4().hex
        if backend == "hf":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.engine = HFEngine(load_model(model_path, dtype), self.tokenizer, device=device,
                                   kv_budget_tokens=kv_budget_tokens,
                                   keep_kv_across_versions=keep_kv_across_versions,
                                   max_prefill_tokens=max_prefill_tokens, lean_forward=lean_forward,
                                   cuda_graphs=cuda_graphs)
        elif backend == "vllm":
            from actors.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path, self.tokenizer, dtype=dtype,
                                     keep_kv_across_versions=keep_kv_across_versions, **(vllm_kwargs or {}))
        else:
            raise ValueError(f"generators.backend {backend!r}: must be 'hf' or 'vllm'")
        self._settings = {"backend": backend, "dtype": dtype, "torch_threads": torch_threads,
                          "kv_budget_tokens": kv_budget_tokens, "max_prefill_tokens": max_prefill_tokens,
                          "keep_kv_across_versions": keep_kv_across_versions, "lean_forward": lean_forward,
                          "cuda_graphs": cuda_graphs,
                          "vllm_kwargs": dict(vllm_kwargs or {})}
        self.weight_store = weight_store
        self._group: WeightGroup | None = None
        if weight_store is not None:  # restarted after a crash: catch up with the latest weights
            self._catch_up()

    def _catch_up(self) -> None:
        """Load the latest pushed weights: the store's buckets, else (broadcast mode) a live peer's copy."""
        import ray

        latest = ray.get(self.weight_store.latest.remote())
        if latest is None:
            return
        version, refs = latest
        if refs is not None:
            self.update_weights(version, refs)
            log.info("generator started at weight version %d", version)
            return
        me = ray.get_runtime_context().get_actor_id()
        for peer in ray.get(self.weight_store.peers.remote()):
            if peer._actor_id.hex() == me:  # never call ourselves from the constructor (it would wait forever)
                continue
            try:
                peer_version, peer_refs = ray.get(peer.export_weights.remote(64 * 2**20), timeout=120)
            except Exception as err:  # noqa: BLE001 - a dead or busy peer: try the next one
                log.warning("could not copy weights from a peer generator: %s", err)
                continue
            self.update_weights(peer_version, peer_refs)
            log.info("generator started at weight version %d (copied from a peer; latest pushed %d)",
                     peer_version, version)
            return
        log.warning("no peer generator to copy weight version %d from: serving the initial weights (version %d) "
                    "until the next push", version, self.engine.version)

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[GenerationOutput]:
        return self.engine.generate(prompts, params, max_new_tokens)

    def generate_turns(self, requests: list[Request], release: list[str] | None = None,
                       forks: list[tuple[str, list[str]]] | None = None) -> list[GenerationOutput]:
        """Run these turns to completion (continuous batching, KV reused across turns).

        ``release``: sessions whose episodes ended; their caches are freed first. ``forks``: (parent session,
        child sessions) of tree rollouts, forked next (:meth:`HFEngine.fork`), before these turns run.
        """
        self._housekeeping(release, forks)
        return self.engine.generate_turns(requests)

    def submit(self, requests: list[Request], release: list[str] | None = None,
               forks: list[tuple[str, list[str]]] | None = None) -> str:
        """Queue turns without waiting (``release`` and ``forks`` as in :meth:`generate_turns`); returns this
        process's ``instance_id``."""
        self._housekeeping(release, forks)
        self.engine.submit(requests)
        return self._instance

    def _housekeeping(self, release: list[str] | None, forks: list[tuple[str, list[str]]] | None) -> None:
        if release:
            self.engine.free(release)
        for parent, children in forks or []:
            self.engine.fork(parent, children)

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

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                          timeout_s: float = 600.0) -> int:
        """Join the learner's weight-broadcast group (rank 0 = learner). Blocks until all joined.

        Joining again (the group is re-formed after a member restarted) replaces the old group.
        """
        if hasattr(self.engine, "init_weight_group"):  # vllm: the group lives in vLLM's worker process
            return self.engine.init_weight_group(host, port, rank, world_size)
        if self._group is not None:
            self._group.close()
        self._group = WeightGroup(host, port, rank, world_size, backend=backend, timeout_s=timeout_s)
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

    def export_weights(self, bucket_bytes: int) -> tuple[int, list]:
        """This generator's weights as object-store buckets: (version, refs). A restarted peer loads them
        when weights travel by broadcast; tests compare them with the learner's."""
        from actors.weights import put_buckets

        if not hasattr(self.engine, "model"):
            raise NotImplementedError(f"backend {self._settings['backend']!r} cannot export its weights")
        return self.engine.version, put_buckets(self.engine.model.state_dict(), bucket_bytes)

    def settings(self) -> dict[str, Any]:
        """The constructor settings as the engine holds them (what the config asked for)."""
        out = dict(self._settings)
        for key in ("kv_budget_tokens", "max_prefill_tokens", "keep_kv_across_versions", "lean_forward", "cuda_graphs"):
            if hasattr(self.engine, key):
                out[key] = getattr(self.engine, key)
        return out

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

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
    """What a restarted generator reloads: the latest pushed version and its object refs.

    With broadcast weight sync no buckets pass through the object store: ``publish(version,
    None)`` records the version only, and a restarted generator copies a live peer
    (``peers``, registered with ``set_peers``).
    """

    def __init__(self) -> None:
        self._latest: tuple[int, list[Any] | None] | None = None
        self._peers: list[Any] = []

    def publish(self, version: int, buckets: list[Any] | None) -> None:
        self._latest = (version, buckets)

    def latest(self) -> tuple[int, list[Any] | None] | None:
        return self._latest

    def set_peers(self, generators: list[Any]) -> None:
        self._peers = list(generators)

    def peers(self) -> list[Any]:
        return self._peers

