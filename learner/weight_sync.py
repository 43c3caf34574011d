"""Pushing the learner's weights to the generators (their constructor arguments: ``learner.trainer``).

- :func:`make_weight_sync` picks the transport of ``learner.weight_sync``
  (:func:`common.config.weight_sync_mode`):

  * :class:`ObjectStoreSync` -- rank 0 packs the policy into buckets
    (:func:`actors.weights.put_buckets`, one copy into shared memory), publishes their refs to
    the :class:`actors.generator.WeightStore` (where restarted generators reload them) and every
    generator copies them into its parameters.
  * :class:`BroadcastSync` -- a ``torch.distributed`` group of its own joins learner rank 0
    (group rank 0) and the generators (ranks 1..n): NCCL on GPU, gloo on CPU. Each push
    broadcasts the buckets of the bucket table (:func:`actors.weights.plan_buckets`, sent once
    through Ray) straight from rank 0's parameters into buffers on the generators' devices; no
    object store. The store then records only the version, and a restarted generator copies a
    live peer before it serves. Before a push the generators' instance ids are compared with
    those of the group: if one restarted, the group is formed again (a dead member breaks it).

Ray is imported inside the methods; the two ``*_kwargs`` functions are plain.
"""

from __future__ import annotations

import logging
from typing import Any

from common.config import Config, weight_sync_mode

log = logging.getLogger(__name__)


class ObjectStoreSync:
    """Weights through the Ray object store, in buckets of ``bucket_bytes``."""

    mode = "object_store"

    def __init__(self, learners: list, generators: list, store: Any, bucket_bytes: int):
        self.learners, self.generators, self.store = learners, generators, store
        self.bucket_bytes = bucket_bytes

    def push(self, version: int) -> None:
        """Export rank 0's weights (every rank joins under ZeRO-3), publish them, apply them on every generator."""
        import ray

        refs = ray.get([lw.export_weights.remote(self.bucket_bytes) for lw in self.learners])[0]
        ray.get(self.store.publish.remote(version, refs))
        ray.get([g.update_weights.remote(version, refs) for g in self.generators])


class BroadcastSync:
    """Weights by ``torch.distributed`` broadcast from learner rank 0 (group rank 0) to the generators."""

    mode = "broadcast"

    def __init__(self, learners: list, generators: list, store: Any, bucket_bytes: int, backend: str,
                 timeout_s: float = 600.0):
        import ray

        self.learners, self.generators, self.store = learners, generators, store
        self.bucket_bytes, self.backend, self.timeout_s = bucket_bytes, backend, timeout_s
        self.plan = ray.get([lw.weight_plan.remote(bucket_bytes) for lw in learners])[0]  # shapes never change
        ray.get(store.set_peers.remote(generators))
        self.instances: list[str] = []
        self.formed = 0  # how many times the group was formed
        self._form()

    def _form(self) -> None:
        """(Re)form the group: rank 0 hosts the rendezvous; loopback when every member is on its node."""
        import ray

        host, port = ray.get(self.learners[0].weight_endpoint.remote())
        ips = ray.get([g.node_ip.remote() for g in self.generators])
        if all(ip == host for ip in ips):
            host = "127.0.0.1"
        world = len(self.generators) + 1
        joins = [g.init_weight_group.remote(host, port, i + 1, world, self.backend, self.timeout_s)
                 for i, g in enumerate(self.generators)]
        ray.get([self.learners[0].init_weight_group.remote(host, port, world, self.backend, self.timeout_s)]
                + joins)
        self.instances = ray.get([g.instance_id.remote() for g in self.generators])
        self.formed += 1
        log.info("weight group formed (%s, %d generators, %s:%d)", self.backend, len(self.generators), host, port)

    def push(self, version: int) -> None:
        """Broadcast the policy; every generator applies it as ``version``. One retry after a broken group."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if ray.get([g.instance_id.remote() for g in self.generators]) != self.instances:
            log.warning("a generator restarted since the weight group formed: forming it again")
            self._form()
        try:
            self._broadcast(version)
        except (RayActorError, RayTaskError) as err:
            log.warning("weight broadcast failed (%s): forming the group again and retrying once",
                        type(err).__name__)
            self._form()
            self._broadcast(version)
        ray.get(self.store.publish.remote(version, None))

    def _broadcast(self, version: int) -> None:
        import ray

        recv = [g.receive_weights.remote(version, self.plan) for g in self.generators]
        send = [lw.broadcast_weights.remote(self.bucket_bytes) for lw in self.learners]  # ZeRO-3: all gather
        ray.get(send + recv)


def make_weight_sync(cfg: Config, learners: list, generators: list, store: Any) -> ObjectStoreSync | BroadcastSync:
    """The transport ``learner.weight_sync`` resolves to (``auto``: broadcast on GPUs, else object store)."""
    mode, backend = weight_sync_mode(cfg)
    bucket_bytes = cfg.learner.bucket_mb * 2**20
    if mode == "broadcast":
        return BroadcastSync(learners, generators, store, bucket_bytes, backend or "gloo")
    return ObjectStoreSync(learners, generators, store, bucket_bytes)
