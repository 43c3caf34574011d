"""Tests of EnvPool (env_workers.pool) over real EnvWorker Ray actors, with workers killed mid-episode.

Every scenario runs the same multi-turn episodes and compares each step result (observation,
turn reward, outcome reward, done) with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from env_workers.demo_data import load_questions
from env_workers.env import StepResult
from env_workers.pool import EnvPool
from env_workers.worker import EnvWorker

ENV_KWARGS = {"max_turns": 3, "top_k": 1}
N_EPISODES = 6


class CrashOnceWorker(EnvWorker):
    """An EnvWorker whose process exits inside its ``crash_on``-th step call, once per flag file."""

    def __init__(self, index_dir: str, env_kwargs: dict, flag_path: str, crash_on: int) -> None:
        super().__init__(index_dir, env_kwargs)
        self._flag, self._crash_on, self._calls = flag_path, crash_on, 0

    def step(self, episode_ids: list[str], actions: list[str]) -> list[StepResult]:
        self._calls += 1
        if self._calls == self._crash_on and not os.path.exists(self._flag):
            Path(self._flag).touch()
            os._exit(1)  # the process dies in the middle of the step call
        return super().step(episode_ids, actions)


def search(query: str) -> str:
    return "<reasoning>r</reasoning><tool>" + json.dumps({"name": "wiki_search", "args": {"query": query}}) + "</tool>"


@pytest.fixture(scope="module")
def episodes(demo_paths: dict[str, Path]) -> list[tuple[dict, list[str]]]:
    """Questions with a three-turn script: search the entity, search the question, answer."""
    qs = [q for q in load_questions(demo_paths["eval"], limit=300) if q["hops"] == 1][:N_EPISODES]
    out = []
    for k, q in enumerate(qs):
        final = q["answers"][0] if k % 2 == 0 else "surely not this"
        out.append((q, [search(q["chain"][0]), search(q["question"]), f"<reasoning>r</reasoning><answer>{final}</answer>"]))
    return out


def _summary(res: StepResult) -> tuple[Any, ...]:
    return (res.observation_text, res.turn_reward, res.done, res.outcome_reward, res.info.get("error_code"))


def run_episodes(pool: EnvPool, episodes: list[tuple[dict, list[str]]],
                 after_turn: Callable[[int], None] | None = None) -> list[list[tuple[Any, ...]]]:
    """Run every episode to its end, turn by turn; ``after_turn(t)`` runs after turn ``t``."""
    ids = [f"ep{k}" for k in range(len(episodes))]
    prompts = pool.reset(ids, [q for q, _ in episodes])
    assert [p[1]["content"] for p in prompts] == [q["question"] for q, _ in episodes]
    log: list[list[tuple[Any, ...]]] = [[] for _ in episodes]
    live = list(range(len(episodes)))
    t = 0
    while live:
        results = pool.step([ids[k] for k in live], [episodes[k][1][t] for k in live])
        assert len(results) == len(live)
        for k, res in zip(live, results):
            log[k].append(_summary(res))
        live = [k for k, res in zip(live, results) if not res.done]
        if after_turn is not None:
            after_turn(t)
        t += 1
    assert pool.num_live() == 0
    return log


def _kill_and_wait(ray: Any, handle: Any, restart: bool) -> None:
    """``ray.kill`` (asynchronous) and wait until it took effect: dead, or back with a new instance id."""
    old = ray.get(handle.ping.remote())
    ray.kill(handle, no_restart=not restart)
    for _ in range(200):
        try:
            if ray.get(handle.ping.remote(), timeout=30) != old:
                return
        except ray.exceptions.RayActorError:
            if not restart:
                return
        time.sleep(0.1)
    raise AssertionError("the killed actor neither died nor restarted")


def _workers(ray: Any, index_dir: Path, n: int = 2, **options: Any) -> list[Any]:
    return [ray.remote(EnvWorker).options(num_cpus=0, **options).remote(str(index_dir), ENV_KWARGS) for _ in range(n)]


@pytest.fixture(scope="module")
def shared(ray_session: Any, demo_index_dir: Path) -> Any:
    """Two healthy workers shared by the tests (each test's episodes finish or are closed)."""
    handles = _workers(ray_session, demo_index_dir)
    yield handles
    for h in handles:
        ray_session.kill(h)


@pytest.fixture(scope="module")
def reference(shared: list, episodes: list) -> list[list[tuple[Any, ...]]]:
    """The uninterrupted run."""
    pool = EnvPool(shared)
    log = run_episodes(pool, episodes)
    assert pool.stats["retries"] == 0 and pool.stats["replays"] == 0
    assert pool.stats["steps_served"] == sum(len(x) for x in log)
    return log


def test_reference_run_is_sane(reference: list[list[tuple[Any, ...]]], episodes: list) -> None:
    for k, turns in enumerate(reference):
        assert len(turns) == 3 and [t[2] for t in turns] == [False, False, True]
        assert turns[0][1]["tool_execution"] == 0.2 and turns[0][1]["result_contains_answer"] == 0.5
        assert turns[2][3]["exact_match"] == (1.0 if k % 2 == 0 else 0.0)


def test_pool_semantics(ray_session: Any, shared: list, episodes: list) -> None:
    ray = ray_session
    pool = EnvPool(shared)
    (q0, s0), (q1, _) = episodes[0], episodes[1]
    before = sum(ray.get([h.num_live.remote() for h in shared]))
    pool.reset(["a", "b", "c"], [q0, q1, q0])
    assert sorted(pool.worker_of(e) for e in "abc") == [0, 0, 1]  # least-loaded placement
    res = pool.step(["a", "ghost", "a", "b"], [s0[0], s0[0], "dup", s0[0]])
    assert not res[0].done and res[0].info["tool_success"]
    assert res[1].done and res[1].info["error_code"] == "unknown_episode"
    assert res[2].done and res[2].info["error_code"] == "duplicate_id"
    assert not res[3].done
    pool.close(["c", "never"])
    assert pool.num_live() == 2
    assert sum(ray.get([h.num_live.remote() for h in shared])) == before + 2
    with pytest.raises(ValueError):
        pool.step(["a"], [])
    assert pool.stats["steps_served"] == 2 and pool.stats["retries"] == 0
    pool.close(["a", "b"])
    assert sum(ray.get([h.num_live.remote() for h in shared])) == before


def test_worker_killed_between_turns_moves_its_episodes(
    ray_session: Any, demo_index_dir: Path, shared: list, episodes: list, reference: list
) -> None:
    """ray.kill without restart after turn 0: the victim's episodes move to the other worker and replay."""
    ray = ray_session
    victim = _workers(ray, demo_index_dir, n=1)[0]
    pool = EnvPool([victim, shared[0]])
    on_victim: list[str] = []

    def kill(t: int) -> None:
        if t == 0:
            on_victim.extend(e for e in (f"ep{k}" for k in range(N_EPISODES)) if pool.worker_of(e) == 0)
            _kill_and_wait(ray, victim, restart=False)

    assert run_episodes(pool, episodes, kill) == reference
    st = pool.stats
    assert st["worker_failures"] == 1 and st["lost"] == 0 and st["replay_mismatches"] == 0
    assert st["replays"] == len(on_victim) == st["retries"] > 0
    assert st["steps_served"] == sum(len(x) for x in reference)  # nothing counted twice
    assert pool.num_workers == 1


def test_worker_crashing_inside_a_step_restarts_and_replays(
    ray_session: Any, demo_index_dir: Path, shared: list, episodes: list, reference: list, tmp_path: Path
) -> None:
    """The process exits during its second step call; Ray restarts it empty; the pool replays."""
    ray = ray_session
    flag = tmp_path / "crashed"
    crashing = ray.remote(CrashOnceWorker).options(num_cpus=0, max_restarts=1).remote(
        str(demo_index_dir), ENV_KWARGS, str(flag), 2)
    pool = EnvPool([crashing, shared[0]])
    assert run_episodes(pool, episodes) == reference
    assert flag.exists()
    st = pool.stats
    assert st["worker_failures"] == 1 and st["restarts_detected"] == 1
    assert st["replays"] == st["retries"] == N_EPISODES // 2
    assert st["lost"] == 0 and st["replay_mismatches"] == 0
    assert st["steps_served"] == sum(len(x) for x in reference)
    assert pool.num_workers == 2
    ray.kill(crashing)


def test_restarted_worker_that_forgot_its_episodes_is_detected(
    ray_session: Any, demo_index_dir: Path, shared: list, episodes: list, reference: list
) -> None:
    """Kill with restart between turns: the restarted actor answers 'unknown episode' (or the call
    fails while it restarts); either way its episodes are rebuilt and the run is unchanged."""
    ray = ray_session
    restartable = _workers(ray, demo_index_dir, n=1, max_restarts=2, max_task_retries=2)[0]
    pool = EnvPool([shared[0], restartable])

    def kill(t: int) -> None:
        if t == 1:
            _kill_and_wait(ray, restartable, restart=True)

    assert run_episodes(pool, episodes, kill) == reference
    st = pool.stats
    assert st["restarts_detected"] == 1 and st["lost"] == 0 and st["replay_mismatches"] == 0
    assert st["replays"] == N_EPISODES // 2 and st["replayed_actions"] == 2 * (N_EPISODES // 2)
    assert st["steps_served"] == sum(len(x) for x in reference)
    ray.kill(restartable)


def test_factory_replaces_a_dead_worker(
    ray_session: Any, demo_index_dir: Path, shared: list, episodes: list, reference: list
) -> None:
    ray = ray_session
    made: list[Any] = []

    def factory(slot: int) -> Any:
        if slot == 1:
            return shared[0]
        made.append(_workers(ray, demo_index_dir, n=1)[0])
        return made[-1]

    pool = EnvPool(factory, num_workers=2)

    def kill(t: int) -> None:
        if t == 1:
            _kill_and_wait(ray, pool.handle(0), restart=False)

    assert run_episodes(pool, episodes, kill) == reference
    st = pool.stats
    assert st["replacements"] == 1 and len(made) == 2 and pool.num_workers == 2
    assert st["lost"] == 0 and st["replays"] == N_EPISODES // 2
    for h in made:
        ray.kill(h)
