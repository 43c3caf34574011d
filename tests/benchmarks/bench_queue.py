"""Replay-queue throughput: turns/s through put + get between Ray actors, Arrow queue vs a list-of-dicts baseline.

Producers are Ray actors that stream turns the way the rollout worker does (one put per turn of
a step's groups, ``ray.get`` on each put); the consumer (this process) takes a step's groups per
get (a blocking get: both queues are asyncio actors with the same contract). Defaults follow
``deploy/configs/local.yaml``: 16 prompts x G = 8 per step, 2 turns per episode. Rows are realistic transitions of
``common.schema`` with ``--tokens``-long id lists (prompt on turn 0, action, log-probs,
observation). The baseline is an actor with the same contract (complete groups, lag check)
holding Python lists of dicts. Both runs happen in this process, alternated ``--repeats``
times; figures are medians. Producers build their payloads before the clock starts (Arrow
batches for the Arrow queue, dicts for the baseline); a third run times the Arrow queue with
the dict -> Arrow conversion (``schema.transitions_to_batch``) inside the producer's loop.

    .venv/bin/python tests/benchmarks/bench_queue.py [--producers 3] [--groups 32] ...

Last line: ``queue_throughput ratio: X`` (Arrow turns/s over baseline turns/s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections import deque
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from common import schema as S
from common.replay_queue import ReplayQueue, register_arrow_serializers

log = logging.getLogger("bench_queue")


class ListQueue:
    """Baseline: the queue's contract (complete groups, lag check, blocking get) over Python lists of dicts.

    An asyncio actor like ``ReplayQueue``, so the two differ only in how turns are represented.
    """

    def __init__(self, max_policy_lag: int = 1):
        self.max_policy_lag = max_policy_lag
        self.groups: dict[int, list[dict]] = {}
        self.finished: dict[int, int] = {}
        self.ready: deque[int] = deque()
        self.changed = asyncio.Condition()

    async def put(self, rows: list[dict]) -> int:
        for r in rows:
            gid = r[S.GROUP_ID]
            self.groups.setdefault(gid, []).append(r)
            if r[S.IS_LAST_TURN]:
                self.finished[gid] = self.finished.get(gid, 0) + 1
                if self.finished[gid] == r[S.GROUP_SIZE]:
                    self.ready.append(gid)
        async with self.changed:
            self.changed.notify_all()
        return len(rows)

    async def get(self, max_groups: int, current_version: int, timeout: float | None = None,
                  min_groups: int | None = None) -> list[dict] | None:
        if timeout:
            need = min_groups or max_groups
            try:
                async with self.changed:
                    await asyncio.wait_for(self.changed.wait_for(lambda: len(self.ready) >= need), timeout)
            except asyncio.TimeoutError:
                pass
        out: list[dict] = []
        taken = 0
        while self.ready and taken < max_groups:
            gid = self.ready.popleft()
            rows = self.groups.pop(gid)
            self.finished.pop(gid)
            if current_version - min(r[S.POLICY_VERSION] for r in rows) > self.max_policy_lag:
                continue
            out += rows
            taken += 1
        return out or None

    async def cpu_seconds(self) -> float:
        return time.process_time()


class ArrowQueue(ReplayQueue):
    """``ReplayQueue`` plus the CPU-time probe the benchmark reads."""

    async def cpu_seconds(self) -> float:
        return time.process_time()


def make_rows(pid: int, n_groups: int, group_size: int, turns: int, tokens: int, batch_groups: int,
              seed: int) -> list[list[dict]]:
    """Per put, the rows of one turn of ``batch_groups`` groups (``turns`` turns per episode)."""
    rng = np.random.default_rng(seed)
    puts = []
    for first in range(0, n_groups, batch_groups):
        gids = [pid * 100_000 + g for g in range(first, min(n_groups, first + batch_groups))]
        for k in range(turns):
            rows = []
            for gid in gids:
                for j in range(group_size):
                    last = k == turns - 1
                    rows.append({
                        S.RUN_ID: "bench", S.GROUP_ID: gid, S.EPISODE_ID: gid * 100 + j, S.PROMPT_ID: gid,
                        S.TURN_INDEX: k, S.POLICY_VERSION: 0,
                        S.CONTEXT_TOKEN_IDS: rng.integers(0, 150_000, tokens).tolist() if k == 0 else [],
                        S.ACTION_TOKEN_IDS: rng.integers(0, 150_000, tokens).tolist(),
                        S.ACTION_LOGPROBS: (-rng.random(tokens, dtype=np.float32)).tolist(),
                        S.OBSERVATION_TOKEN_IDS: [] if last else rng.integers(0, 150_000, tokens).tolist(),
                        S.STATE_HASH: int(rng.integers(-2**62, 2**62)), S.TURN_REWARD: 0.1,
                        S.TURN_REWARD_COMPONENTS: {"format": 0.05, "tool_success": 0.05}, S.IS_LAST_TURN: last,
                        S.OUTCOME_REWARD: 1.0 if last else 0.0,
                        S.OUTCOME_REWARD_COMPONENTS: {"exact_match": 1.0} if last else {},
                        S.TRUNCATED: False, S.TOOL_CALLED: k > 0, S.TOOL_SUCCESS: k > 0,
                        S.RESULT_CONTAINS_ANSWER: False, S.GROUP_SIZE: group_size,
                        S.T_START: time.time(), S.T_END: time.time(),
                    })
            puts.append(rows)
    return puts


class Producer:
    """Streams prepared puts into a queue actor; returns each put's latency."""

    def prepare(self, fmt: str, **kwargs: Any) -> int:
        self.fmt = fmt
        if fmt.startswith("arrow"):
            register_arrow_serializers()  # the one line a rollout worker adds: batches travel as Arrow IPC
        rows = make_rows(**kwargs)
        self.payloads = [S.transitions_to_batch(r) for r in rows] if fmt == "arrow" else rows
        self.warmup = S.transitions_to_batch(rows[0][:1]) if fmt.startswith("arrow") else rows[0][:1]
        return sum(len(r) for r in rows)

    def warm(self, queue) -> None:
        """One single-row put of a group nobody completes, so first-call costs are not timed."""
        w, key = self.warmup, -1 - id(self) % 10**9
        if self.fmt.startswith("arrow"):
            for col in (S.GROUP_ID, S.EPISODE_ID):
                w = w.set_column(w.schema.get_field_index(col), col, pa.array([key], pa.int64()))
        else:
            w = [{**w[0], S.GROUP_ID: key, S.EPISODE_ID: key}]
        ray.get(queue.put.remote(w))

    def run(self, queue) -> list[float]:
        latencies = []
        for p in self.payloads:
            t0 = time.perf_counter()
            if self.fmt == "arrow+convert":
                p = S.transitions_to_batch(p)
            ray.get(queue.put.remote(p))
            latencies.append(time.perf_counter() - t0)
        return latencies


def run_once(fmt: str, producers: list, args: argparse.Namespace) -> dict[str, float]:
    kw = dict(n_groups=args.groups, group_size=args.group_size, turns=args.turns, tokens=args.tokens,
              batch_groups=args.batch_groups)
    total = sum(ray.get([p.prepare.remote(fmt, pid=i, seed=i, **kw) for i, p in enumerate(producers)]))
    if fmt == "dicts":
        queue = ray.remote(ListQueue).options(num_cpus=0).remote(1)
    else:
        queue = ray.remote(ArrowQueue).options(num_cpus=0).remote(10**7, 1)
    ray.get([p.warm.remote(queue) for p in producers])
    ray.get(queue.get.remote(1, 0))
    rows_per_group = args.group_size * args.turns
    cpu0 = ray.get(queue.cpu_seconds.remote())
    t0 = time.perf_counter()
    refs = [p.run.remote(queue) for p in producers]
    got, get_lat = 0, []
    while got < total:
        need = min(args.get_groups, (total - got) // rows_per_group)
        t = time.perf_counter()
        out = ray.get(queue.get.remote(args.get_groups, 0, timeout=10.0, min_groups=need))
        if out is None:
            continue
        get_lat.append(time.perf_counter() - t)
        got += len(out)
    elapsed = time.perf_counter() - t0
    cpu = ray.get(queue.cpu_seconds.remote()) - cpu0
    put_lat = [x for xs in ray.get(refs) for x in xs]
    ray.kill(queue)
    return {"turns_per_s": total / elapsed, "put_p99_ms": 1e3 * float(np.percentile(put_lat, 99)),
            "get_p99_ms": 1e3 * float(np.percentile(get_lat, 99)), "queue_cpu_us_per_turn": 1e6 * cpu / total,
            "turns": total, "seconds": elapsed}


def data_path_us_per_turn(args: argparse.Namespace) -> dict[str, float]:
    """CPU per turn of each representation alone, in one process (no Ray calls): serialize the put as
    Ray would (cloudpickle / Arrow IPC), deserialize, queue bookkeeping, same for the get."""
    import ray.cloudpickle as cloudpickle

    from common.replay.wire import batch_from_ipc, batch_to_ipc, table_from_ipc, table_to_ipc

    puts = make_rows(0, args.groups, args.group_size, args.turns, args.tokens, args.batch_groups, seed=0)
    batches = [S.transitions_to_batch(r) for r in puts]
    total = sum(len(r) for r in puts)

    async def dicts() -> None:
        q = ListQueue(1)
        for rows in puts:
            await q.put(cloudpickle.loads(cloudpickle.dumps(rows, protocol=5)))
            while (out := await q.get(args.get_groups, 0)) is not None:
                cloudpickle.loads(cloudpickle.dumps(out, protocol=5))

    async def arrow() -> None:
        q = ReplayQueue(10**7, 1)
        for b in batches:
            await q.put(batch_from_ipc(batch_to_ipc(b)))
            while (out := await q.get(args.get_groups, 0)) is not None:
                table_from_ipc(table_to_ipc(out))

    out = {}
    for name, fn in (("dicts", dicts), ("arrow", arrow)):
        asyncio.run(fn())  # warm
        t0 = time.process_time()
        asyncio.run(fn())
        out[name] = 1e6 * (time.process_time() - t0) / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--groups", type=int, default=64, help="groups per producer")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--turns", type=int, default=2, help="turns per episode (max_turns in deploy/configs)")
    ap.add_argument("--tokens", type=int, default=100, help="length of each token-id list")
    ap.add_argument("--batch-groups", type=int, default=16,
                    help="groups per put: one turn of each episode of a step (prompts_per_step)")
    ap.add_argument("--get-groups", type=int, default=16, help="groups per get (prompts_per_step)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ray.init(num_cpus=args.producers + 1, include_dashboard=False, log_to_driver=False)
    producers = [ray.remote(Producer).options(num_cpus=0).remote() for _ in range(args.producers)]
    results: dict[str, list[dict[str, float]]] = {"dicts": [], "arrow": [], "arrow+convert": []}
    for r in range(args.repeats):
        for fmt in results:
            res = run_once(fmt, producers, args)
            results[fmt].append(res)
            log.info("repeat %d %-13s %8.0f turns/s  put p99 %6.2f ms  get p99 %6.2f ms  queue CPU %5.1f us/turn"
                     "  (%d turns, %.2f s)", r, fmt, res["turns_per_s"], res["put_p99_ms"], res["get_p99_ms"],
                     res["queue_cpu_us_per_turn"], res["turns"], res["seconds"])
    med = {fmt: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for fmt, rs in results.items()}
    print(f"{'queue':<14}{'turns/s':>10}{'put p99 ms':>12}{'get p99 ms':>12}{'queue CPU us/turn':>19}")
    for fmt, m in med.items():
        print(f"{fmt:<14}{m['turns_per_s']:>10.0f}{m['put_p99_ms']:>12.2f}{m['get_p99_ms']:>12.2f}"
              f"{m['queue_cpu_us_per_turn']:>19.1f}")
    conv = med["arrow+convert"]["turns_per_s"] / med["dicts"]["turns_per_s"]
    print(f"arrow incl. dict->Arrow conversion in the producer vs baseline: {conv:.2f}x")
    ray.shutdown()
    dp = data_path_us_per_turn(args)
    print(f"data path alone, no Ray (serialize, queue, serialize back; CPU per turn): dicts {dp['dicts']:.1f} us, "
          f"arrow {dp['arrow']:.1f} us: {dp['dicts'] / dp['arrow']:.2f}x")
    print(f"queue_throughput ratio: {med['arrow']['turns_per_s'] / med['dicts']['turns_per_s']:.2f}")


if __name__ == "__main__":
    main()
