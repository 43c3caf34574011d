"""CUDA-graph replay of the session engine's decode step (``generators.cuda_graphs``, GPU only).

On a GPU a decode step of a small or mid-sized model is bound by launching ~15 kernels per
layer from Python, not by arithmetic (docs/benchmarks.md: ~2.8 ms per step for a 12-layer
100M model at batch 64 on an H200, a tenth of the card's fp32 rate). :class:`DecodeGraphs`
records the lean forward (:class:`actors.lean_forward.LeanForward`) of one decode step once
per batch-size bucket and replays it, so a step costs one graph launch plus sampling.

What changes against the eager decode step:

* the batch is padded to the next bucket (1, 2, 4, ... 256 rows). The padding rows write
  their junk K/V into free slots (running rows always occupy slots ``[0, n)``), so the slab is
  grown to ``bucket`` slots when it holds fewer; above 256 rows the step runs eagerly;
* attention reads every column of the slab (its width) instead of ``max(qpos) + 1``; the mask
  hides the same columns, so results equal the eager step's up to the order of the floating
  point reduction (greedy tokens equal, log-probs within 1e-4 in tests/actors/test_cuda_graphs.py).

Graphs hold the addresses of the parameters and of the KV slabs. Weight updates copy into the
parameters in place, so they need no new capture; a slab that grows is a new tensor, so every
graph is dropped and captured again at the next step. The first step of a bucket runs the real
inputs eagerly (it is the warm-up), then captures; later steps replay. A capture or replay that
fails switches the engine back to eager decoding (``HFEngine._forward``). Measured on an H200:
docs/benchmarks.md ("CUDA graphs").
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Graph:
    __slots__ = ("graph", "ids", "qpos", "out")

    def __init__(self, graph, ids: torch.Tensor, qpos: torch.Tensor, out: torch.Tensor):
        self.graph, self.ids, self.qpos, self.out = graph, ids, qpos, out


class DecodeGraphs:
    """Captured decode steps of ``lean`` over ``slots``, one per batch bucket."""

    def __init__(self, lean, slots, device: torch.device | str):
        self.lean, self.slots, self.device = lean, slots, torch.device(device)
        self.graphs: dict[int, _Graph] = {}
        self._slab_key: tuple | None = None
        self._pool = None
        self.captures = 0
        self.replays = 0

    def _step(self, ids: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """The decode step over every slab column: logits float[B, V] (also what gets captured)."""
        width = self.slots.width
        cols = torch.arange(width, device=ids.device)
        allowed = (cols[None, None, :] <= qpos[:, :, None])[:, None]  # [B, 1, 1, W]
        return self.lean(ids, qpos, 0, ids.shape[0], width, allowed)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor | None:
        """Logits float[n, V] of a decode step of rows ``[0, n)`` (ids, qpos long[n, 1] on the
        device); ``None`` when the step cannot be replayed (the caller runs it eagerly)."""
        n = ids.shape[0]
        bucket = next((b for b in BUCKETS if b >= n), None)
        if bucket is None or not self.slots.keys:
            return None
        if bucket > self.slots.slots:  # room for the padding rows (a new slab: captured again below)
            self.slots.ensure(bucket, self.slots.width, used=n)
        key = (self.slots.keys[0].data_ptr(), self.slots.slots, self.slots.width)
        if key != self._slab_key:  # new slabs: the recorded addresses are stale
            self.graphs.clear()
            self._pool = None  # the pool went with its graphs: a stale handle trips the allocator
            self._slab_key = key
        g = self.graphs.get(bucket)
        if g is None:
            return self._capture(bucket, ids, qpos)
        g.ids[:n].copy_(ids)
        g.qpos[:n].copy_(qpos)
        if n < bucket:
            g.ids[n:].zero_()
            g.qpos[n:].zero_()
        g.graph.replay()
        self.replays += 1
        return g.out[:n]

    def _capture(self, bucket: int, ids: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        s_ids = torch.zeros((bucket, 1), dtype=torch.long, device=self.device)
        s_qpos = torch.zeros((bucket, 1), dtype=torch.long, device=self.device)
        s_ids[:n].copy_(ids)
        s_qpos[:n].copy_(qpos)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require: the real step
            logits = self._step(s_ids, s_qpos)[:n].clone()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # recorded, not run: the K/V written above stay
            out = self._step(s_ids, s_qpos)
        self._pool = graph.pool()
        self.graphs[bucket] = _Graph(graph, s_ids, s_qpos, out)
        self.captures += 1
        log.debug("captured the decode step for %d rows (slab width %d)", bucket, self.slots.width)
        return logits
