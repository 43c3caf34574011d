"""Moving policy weights from the learner to the generators, in buckets.

Two transports, one bucket layout (a flat byte buffer + a table of tensors in it):

* **Ray object store (CPU, any cluster)** -- :func:`pack_buckets` turns a state dict into
  :class:`PackedBucket` objects whose payload is a list of ``uint8`` numpy arrays that
  *view* the tensors' memory (no copy). ``ray.put`` serialises them out of band, copying
  each tensor once into shared memory; every generator on the node maps them zero-copy
  (numpy arrays are read from the object store without a copy) and copies them straight
  into its parameters (:func:`apply_bucket`): one copy on each side, where pickling torch
  tensors costs two or three. A plain dict of torch tensors, the old format, is still
  accepted everywhere.
* **torch.distributed broadcast (NCCL on GPU, gloo on CPU for tests)** --
  :class:`WeightGroup` is a process group of its own (a ``TCPStore`` + a backend
  process group, independent of any default group the learner already has, e.g.
  DeepSpeed's). The learner (rank 0) calls :meth:`WeightGroup.send`; each generator
  (rank 1..n) calls :meth:`WeightGroup.recv` with the bucket table (:func:`plan_buckets`,
  sent through Ray) and gets the same :class:`PackedBucket` objects back, filled.

Tensors that share storage (tied input/output embeddings) travel once; the table
lists the other names as aliases.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # str(torch.dtype), e.g. "torch.bfloat16"
    shape: tuple[int, ...]
    offset: int  # byte offset in the bucket buffer
    nbytes: int
    aliases: tuple[str, ...] = ()  # other state-dict names of the same tensor (tied weights)


@dataclass
class PackedBucket:
    """A bucket of tensors as raw bytes: either one flat buffer (``data``, laid out by the
    specs' offsets; the broadcast path) or one array per spec (``parts``; the object-store path)."""

    specs: list[TensorSpec]
    nbytes: int
    data: np.ndarray | torch.Tensor | None = None  # uint8 [nbytes]; None in a plan (metadata only)
    parts: list[np.ndarray] | None = None  # uint8 [spec.nbytes] per spec
    extra: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views of the tensors (read-only memory when it came from the object store)."""
        import warnings

        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about read-only numpy memory; we only read it
            buf = torch.from_numpy(self.data) if isinstance(self.data, np.ndarray) else self.data
            for i, s in enumerate(self.specs):
                raw = torch.from_numpy(self.parts[i]) if self.parts is not None else buf[s.offset:s.offset + s.nbytes]
                t = raw.view(_DTYPES[s.dtype]).view(s.shape)
                for name in (s.name, *s.aliases):
                    out[name] = t
        return out


def _dedupe(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, tuple[str, ...]]]:
    seen: dict[tuple[int, int, tuple[int, ...]], int] = {}
    items: list[tuple[str, torch.Tensor, list[str]]] = []
    for name, t in state.items():
        key = (t.data_ptr(), t.numel(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            items[seen[key]][2].append(name)
            continue
        if key is not None:
            seen[key] = len(items)
        items.append((name, t, []))
    return [(n, t, tuple(a)) for n, t, a in items]


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[PackedBucket]:
    """The bucket table of a state dict (no data): what a receiver needs to allocate and unpack."""
    plans: list[PackedBucket] = [PackedBucket([], 0)]
    for name, t, aliases in _dedupe(state):
        nbytes = t.numel() * t.element_size()
        cur = plans[-1]
        if cur.specs and cur.nbytes + nbytes > bucket_bytes:
            cur = PackedBucket([], 0)
            plans.append(cur)
        off = -(-cur.nbytes // 16) * 16  # 16-byte aligned views
        cur.specs.append(TensorSpec(name, str(t.dtype), tuple(t.shape), off, nbytes, aliases))
        cur.nbytes = off + nbytes
    return [p for p in plans if p.specs]


def fill_buffer(buf: torch.Tensor, plan: PackedBucket, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Copy the tensors of ``plan`` from ``state`` into the flat uint8 ``buf`` at their offsets; return ``buf``."""
    for s in plan.specs:
        t = state[s.name].detach().to(buf.device)
        buf[s.offset:s.offset + s.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
    return buf


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a tensor's memory (a copy only if it is not a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def pack_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[PackedBucket]:
    """Bucket a state dict as byte views of its tensors (no copy for contiguous CPU tensors).

    The buckets alias the state's memory until they are ``ray.put``: do not modify the
    tensors in between.
    """
    return [PackedBucket(plan.specs, plan.nbytes, parts=[_as_bytes(state[s.name]) for s in plan.specs])
            for plan in plan_buckets(state, bucket_bytes)]


def put_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list:
    """Learner side of the object-store path: pack and ``ray.put`` each bucket; return the refs."""
    import ray

    return [ray.put(b) for b in pack_buckets(state, bucket_bytes)]


def apply_bucket(params: dict[str, torch.Tensor], bucket: PackedBucket | dict[str, torch.Tensor]) -> int:
    """Copy one bucket into ``params`` (name -> parameter/buffer tensor) in place; return tensors copied."""
    tensors = bucket.tensors() if isinstance(bucket, PackedBucket) else bucket
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise KeyError(f"weight update has unknown tensors: {unknown[:5]}")
    with torch.no_grad():
        done: set[int] = set()
        for name, src in tensors.items():
            dst = params[name]
            if dst.data_ptr() in done:  # tied weight already written
                continue
            if dst.shape != src.shape:
                raise ValueError(f"weight update: {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)
            done.add(dst.data_ptr())
    return len(tensors)


class WeightGroup:
    """A dedicated torch.distributed group: rank 0 = learner, ranks 1..n = generators.

    ``backend``: "nccl" (GPU tensors, the production path) or "gloo" (CPU; tests).
    Every member must construct it (it blocks until all have joined).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                 timeout_s: float = 600.0, device: str | None = None):
        import torch.distributed as dist

        self.rank, self.world_size, self.backend = rank, world_size, backend
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore("turnrl_weights", self.store)
        if backend == "nccl":
            if not torch.cuda.is_available() or not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("the nccl weight group needs CUDA and a torch build with NCCL")
            self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
        elif backend == "gloo":
            self.device = torch.device(device or "cpu")
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            raise ValueError(f"weight group backend {backend!r}: use 'nccl' or 'gloo'")

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def send(self, state: dict[str, torch.Tensor], bucket_bytes: int) -> list[PackedBucket]:
        """Rank 0: broadcast ``state`` bucket by bucket; return the plan (give it to the receivers first)."""
        plans = plan_buckets(state, bucket_bytes)
        for plan in plans:
            self._broadcast(fill_buffer(torch.empty(plan.nbytes, dtype=torch.uint8, device=self.device), plan, state))
        return plans

    def recv(self, plans: list[PackedBucket]) -> list[PackedBucket]:
        """Ranks 1..n: receive the buckets described by ``plans`` (from :func:`plan_buckets`)."""
        out = []
        for plan in plans:
            buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buf)
            out.append(PackedBucket(plan.specs, plan.nbytes, buf))
        return out

    def close(self) -> None:
        self.pg = None
        self.store = None
