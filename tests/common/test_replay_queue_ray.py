"""The replay queue as a real (async) Ray actor: many producers and consumers with random pauses."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow as pa
import pytest

from common import metrics as M
from common import schema as S
from common.replay_queue import QueueFull, ReplayQueue
from tests.common.test_replay_queue import assert_complete_groups, batch, group_lags, group_rows, keys, turn_row

ray = pytest.importorskip("ray")


class Clock:
    """The learner's policy version, shared by the simulated generators and learners."""

    def __init__(self) -> None:
        self.version, self.done = 0, False

    def reset(self) -> None:
        self.version, self.done = 0, False

    def get(self) -> tuple[int, bool]:
        return self.version, self.done

    def bump(self) -> int:
        self.version += 1
        return self.version

    def finish(self) -> None:
        self.done = True


class Worker:
    """Hosts simulated rollout workers and learners as concurrent threads (a threaded actor: fewer processes)."""

    def produce(self, queue, clock, pid: int, n_groups: int, seed: int) -> list[tuple[int, int]]:
        """A rollout worker: opens groups, streams turns of its live episodes, syncs weights now and then."""
        rng = random.Random(seed)
        version = ray.get(clock.get.remote())[0]
        live: dict[tuple[int, int], list[int]] = {}  # (gid, eid) -> [turns, next turn, group size]
        opened, sent = 0, []
        while opened < n_groups or live:
            if opened < n_groups and len({g for g, _ in live}) < 3:
                gid, size = pid * 1000 + opened, rng.randint(1, 3)
                opened += 1
                for j in range(size):
                    live[(gid, gid * 10 + j)] = [rng.randint(1, 3), 0, size]
            rows = []
            for key in rng.sample(list(live), rng.randint(1, len(live))):
                n, k, size = live[key]
                rows.append(turn_row(key[0], key[1], k, last=k == n - 1, version=version, size=size))
                live[key][1] += 1
                if k == n - 1:
                    del live[key]
            rng.shuffle(rows)
            ray.get(queue.put.remote(batch(rows)))
            sent += [(r[S.EPISODE_ID], r[S.TURN_INDEX]) for r in rows]
            if rng.random() < 0.3:
                version = ray.get(clock.get.remote())[0]  # weight sync
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.03)  # a pause
        return sent


    def consume(self, queue, clock, seed: int) -> list[tuple[int, pa.Table]]:
        """A learner: takes groups at its current version, trains (version += 1), pauses at random."""
        rng = random.Random(seed)
        got = []
        while True:
            version, done = ray.get(clock.get.remote())
            table = ray.get(queue.get.remote(rng.randint(1, 3), version, timeout=0.2))
            if table is not None:
                got.append((version, table))
                ray.get(clock.bump.remote())
            elif done:
                return got
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.03)


@pytest.fixture(scope="module")
def workers(ray_local):
    clock = ray.remote(Clock).options(num_cpus=0).remote()
    workers = [ray.remote(Worker).options(num_cpus=0, max_concurrency=4).remote() for _ in range(2)]
    yield clock, workers
    for a in [clock, *workers]:
        ray.kill(a)


@pytest.mark.parametrize("max_policy_lag", [10**6, 1])
def test_many_producers_and_consumers_with_random_pauses(workers, tmp_path: Path, max_policy_lag: int) -> None:
    clock, (w0, w1) = workers
    ray.get(clock.reset.remote())
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(
        12, max_policy_lag, memory_bytes=150, spill_dir=str(tmp_path))
    # 12 rows: producers block. 150 bytes is under one row (~190 B), so the first stored row already spills:
    # the spill path is exercised whatever the schedule (a larger budget spilled only on some schedules).
    # three producers and two consumers, each a thread calling the queue actor through Ray
    sent_refs = [w.produce.remote(queue, clock, i, 6, seed=100 * max_policy_lag + i)
                 for i, w in enumerate([w0, w1, w0])]
    got_refs = [w.consume.remote(queue, clock, seed=7 * max_policy_lag + i) for i, w in enumerate([w1, w0])]
    sent = [k for ks in ray.get(sent_refs) for k in ks]
    ray.get(clock.finish.remote())
    got = [x for xs in ray.get(got_refs) for x in xs]
    last = ray.get(queue.get.remote(1000, ray.get(clock.get.remote())[0]))
    if last is not None:
        got.append((ray.get(clock.get.remote())[0], last))
    stats = ray.get(queue.stats.remote())
    ray.kill(queue)

    released: list[tuple[int, int]] = []
    for version, table in got:
        assert_complete_groups(table)
        assert max(group_lags(table, version).values()) <= max_policy_lag
        released += keys(table)
    assert len(released) == len(set(released)), "a transition was released twice"
    assert len(sent) == len(set(sent)) and set(released) <= set(sent)
    assert stats[M.QUEUE_ROWS] == 0 and stats[M.QUEUE_SPILLED_TOTAL] > 0
    assert stats[M.QUEUE_PUT_ROWS] == len(sent) - stats[M.QUEUE_DROPPED_LATE]
    assert stats[M.QUEUE_PUT_ROWS] == len(released) + stats[M.QUEUE_DROPPED_STALE_ROWS]
    if max_policy_lag == 10**6:
        assert sorted(released) == sorted(sent)  # every transition arrived exactly once
    else:
        assert stats[M.POLICY_LAG_RELEASED_MAX] <= 1


def test_backpressure_and_errors_through_ray(ray_local) -> None:
    queue = ray.remote(ReplayQueue).options(num_cpus=0).remote(4, 5)
    assert ray.get(queue.put.remote(batch(group_rows(0)))) == 4
    blocked = queue.put.remote(batch(group_rows(1)))
    ready, _ = ray.wait([blocked], timeout=0.3)
    assert not ready  # the producer waits...
    assert ray.get(queue.stats.remote())[M.QUEUE_ROWS] == 4  # ...while the actor keeps answering
    with pytest.raises(QueueFull):
        ray.get(queue.put.remote(batch(group_rows(2)), timeout=0.05))
    b = batch(group_rows(3))
    with pytest.raises(TypeError, match="missing columns"):
        ray.get(queue.put.remote(b.drop_columns([S.TURN_REWARD])))
    assert ray.get(queue.get.remote(1, 0)).column(S.GROUP_ID).unique().to_pylist() == [0]
    assert ray.get(blocked, timeout=60) == 4  # room made: the blocked put went through
    assert ray.get(queue.num_complete.remote()) == 1
    ray.kill(queue)


def test_queue_actor_restart_restores_snapshot_and_keeps_the_bound(ray_local, tmp_path: Path) -> None:
    q1 = ray.remote(ReplayQueue).options(num_cpus=0).remote(100, 1)
    for gid, version in enumerate([0, 1, 2, 3]):
        ray.get(q1.put.remote(batch(group_rows(gid, version=version))))
    ray.get(q1.put.remote(batch([turn_row(9, 900, 0, last=False, version=3)])))  # in flight
    assert ray.get(q1.get.remote(1, 1)).column(S.GROUP_ID)[0].as_py() == 0
    ray.get(q1.snapshot.remote(str(tmp_path / "snap")))
    ray.kill(q1)  # the queue (and the producers) go away; the learner resumes later at version 3

    q2 = ray.remote(ReplayQueue).options(num_cpus=0).remote(100, 1)
    assert ray.get(q2.restore.remote(str(tmp_path / "snap"))) == 13
    assert ray.get(q2.put.remote(batch(group_rows(0)))) == 0  # released before the snapshot: late
    table = ray.get(q2.get.remote(10, 3))
    assert sorted(set(table.column(S.GROUP_ID).to_pylist())) == [2, 3]  # group 1 lags 2 > 1: dropped
    assert ray.get(q2.abort_groups.remote()) == 1  # group 9 lost its producer
    stats = ray.get(q2.stats.remote())
    assert stats[M.QUEUE_DROPPED_STALE] == 1 and stats[M.QUEUE_PUT_ROWS] == 17 and stats[M.QUEUE_GET_ROWS] == 12
    assert stats[M.QUEUE_ROWS] == 0 and stats[M.QUEUE_ABORTED_GROUPS] == 1 and stats[M.QUEUE_DROPPED_LATE] == 4
    ray.kill(q2)
