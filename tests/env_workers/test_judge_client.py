"""The env workers' judge client (env_workers.judge_client) and the ``judge`` rubric term of EnvWorker:
cache, batching over actors, failures and timeouts scoring 0, through real Ray judge actors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from env_workers.demo_data import load_questions
from env_workers.judge_client import JudgeClient
from env_workers.judge_model import JudgeActor
from env_workers.worker import EnvWorker


class Recorder:
    """A judge that scores a prompt by its length parity and records the batches it was sent."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def score(self, prompts: list[str]) -> dict[str, Any]:
        self.batches.append(list(prompts))
        return {"scores": [float(len(p) % 2) for p in prompts], "seconds": 0.01}


class Broken:
    def __init__(self, reply: Any = None) -> None:
        self.reply = reply

    def score(self, prompts: list[str]) -> Any:
        if self.reply is None:
            raise RuntimeError("judge down")
        return self.reply


def _items(n: int, kind: str = "turn") -> list[tuple[str, dict]]:
    return [(kind, {"question": f"q{i}", "observation": "o" * i}) for i in range(n)]


def test_cache_dedup_and_batching_over_judges() -> None:
    a, b = Recorder(), Recorder()
    c = JudgeClient([a, b], turn_weight=1.0, batch_size=2, cache_size=100)
    items = _items(5) + _items(1)  # the last repeats item 0 within the call
    scores = c.score(items)
    want = [float(len(c.prompt("turn", f)) % 2) for _, f in items]
    assert scores == want
    assert [len(x) for x in a.batches] == [2, 1] and [len(x) for x in b.batches] == [2]  # round robin, 5 unique
    again = c.score(items[:3])  # all cached: no judge call
    assert again == want[:3] and len(a.batches) + len(b.batches) == 3
    st = c.stats()
    assert st["requests"] == 9 and st["cache_hits"] == 4 and st["scored"] == 5  # 1 repeat in the call, 3 cached and st["failures"] == 0
    assert st["turn_items"] == 9 and st["turn_score_sum"] == sum(want) + sum(want[:3])
    assert st["model_s"] == pytest.approx(0.03)
    # The kind is part of the key: the same fields as an outcome item are judged anew.
    c.score([("outcome", items[0][1])])
    assert c.stats()["cache_hits"] == 4


def test_lru_cache_is_bounded() -> None:
    r = Recorder()
    c = JudgeClient([r], outcome_weight=1.0, cache_size=2)
    c.score(_items(3, "outcome"))
    assert len(c._cache) == 2
    c.score(_items(1, "outcome"))  # item 0 was evicted first
    assert c.stats()["cache_hits"] == 0
    off = JudgeClient([Recorder()], turn_weight=1.0, cache_size=0)
    off.score(_items(2))
    off.score(_items(2))
    assert off.stats()["cache_hits"] == 0 and not off._cache


def test_failures_score_zero_are_counted_and_not_cached() -> None:
    for judge in (Broken(), Broken({"scores": [1.0]}), Broken("nonsense")):  # raises; wrong length; wrong type
        c = JudgeClient([judge], turn_weight=1.0)
        assert c.score(_items(3)) == [0.0, 0.0, 0.0]
        assert c.stats()["failures"] == 3 and not c._cache
    c = JudgeClient([Broken({"scores": [float("nan"), 7.0, -1]})], turn_weight=1.0)
    assert c.score(_items(3)) == [0.0, 1.0, 0.0]  # untrusted numbers are clamped into [0, 1]


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least one judge"):
        JudgeClient([], turn_weight=1.0)
    with pytest.raises(ValueError, match="one > 0"):
        JudgeClient([Recorder()])
    with pytest.raises(ValueError, match="unknown placeholder"):
        JudgeClient([Recorder()], turn_weight=1.0, turn_template="{question} {secret}")


class SlowJudge:
    """A Ray judge actor that answers after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def score(self, prompts: list[str]) -> dict[str, Any]:
        time.sleep(self.delay)
        return {"scores": [1.0] * len(prompts), "seconds": self.delay}


def test_real_judge_actors_timeouts_and_a_dying_judge(ray_session: Any, tiny_policy: Path) -> None:
    ray = ray_session
    real = ray.remote(JudgeActor).options(num_cpus=0, max_restarts=-1, max_task_retries=0).remote(str(tiny_policy))
    slow = ray.remote(SlowJudge).options(num_cpus=0).remote(5.0)
    try:
        c = JudgeClient([real], turn_weight=1.0, batch_size=3, timeout_s=60)
        scores = c.score(_items(7))
        local = JudgeActor(str(tiny_policy)).score([c.prompt("turn", f) for _, f in _items(7)])["scores"]
        assert scores == pytest.approx(local, abs=1e-5) and c.stats()["calls"] == 3
        late = JudgeClient([slow], turn_weight=1.0, timeout_s=0.5)
        t0 = time.time()
        assert late.score(_items(2)) == [0.0, 0.0] and late.stats()["failures"] == 2
        assert time.time() - t0 < 4.0  # it did not wait for the slow judge
        # A judge actor that dies inside a call: the batch is sent again to the restarted actor (a retry), so
        # nothing scores 0; a judge that stays away for longer than the timeout gives 0s, counted.
        ray.get(real.arm_exit.remote())
        fresh = _items(4, "outcome")
        want = JudgeActor(str(tiny_policy)).score([c.prompt("outcome", f) for _, f in fresh])["scores"]
        assert c.score(fresh) == pytest.approx(want, abs=1e-5)
        assert c.stats()["retries"] >= 1 and c.stats()["failures"] == 0
        ray.get(real.arm_exit.remote())
        impatient = JudgeClient([real], outcome_weight=1.0, timeout_s=0.2)
        assert impatient.score(fresh) == [0.0] * 4 and impatient.stats()["failures"] == 4
    finally:
        for h in (real, slow):
            ray.kill(h, no_restart=True)


def test_env_worker_adds_judge_terms_in_one_batched_call(demo_index_dir: Path, demo_paths: dict) -> None:
    qs = [q for q in load_questions(demo_paths["eval"], limit=100) if q["hops"] == 1][:3]
    rec = Recorder()
    w = EnvWorker(str(demo_index_dir), {"max_turns": 2},
                  judge=JudgeClient([rec], turn_weight=0.2, outcome_weight=0.4, cache_size=0))
    w.reset(["a", "b", "c"], [qs[0], qs[1], {**qs[2], "judge": False}])  # c: a held-out evaluation episode
    tool = lambda q: ("<reasoning>r</reasoning><tool>" + json.dumps(  # noqa: E731
        {"name": "wiki_search", "args": {"query": q["chain"][0]}}) + "</tool>")
    r = w.step(["a", "b", "c"], [tool(qs[0]), "no tool call at all", tool(qs[2])])
    # one call: a's search and b's (malformed, so final) answer; c is never judged
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 2
    assert rec.batches[0][0].startswith("Search result: <result>") and qs[0]["question"] in rec.batches[0][0]
    assert r[0].turn_reward["judge"] == pytest.approx(0.2 * r[0].info["judge_turn_score"])
    assert r[1].done and r[1].turn_reward["judge"] == 0.0 and "judge_turn_score" not in r[1].info
    assert r[1].outcome_reward["judge"] == pytest.approx(0.4 * r[1].info["judge_outcome_score"])
    assert r[2].turn_reward["judge"] == 0.0 and "judge_turn_score" not in r[2].info
    done = w.step(["a", "c"], [f"<reasoning>r</reasoning><answer>{qs[0]['answers'][0]}</answer>", "<answer>x</answer>"])
    assert all(d.done for d in done) and len(rec.batches) == 2 and len(rec.batches[1]) == 1
    assert qs[0]["answers"][0] in rec.batches[1][0]  # the reference and the candidate answer fill the prompt
    assert done[0].outcome_reward["judge"] == pytest.approx(0.4 * done[0].info["judge_outcome_score"])
    assert done[0].outcome_reward["exact_match"] == 1.0 and done[1].outcome_reward["judge"] == 0.0
    assert w.judge_stats()["requests"] == 3 and w.judge_stats()["instance_id"] == w.ping()
    # A failing judge scores 0 and the step still succeeds; without a judge nothing is added.
    broken = EnvWorker(str(demo_index_dir), {"max_turns": 2}, judge=JudgeClient([Broken()], outcome_weight=1.0))
    broken.reset(["e"], [qs[0]])
    [res] = broken.step(["e"], ["<answer>x</answer>"])
    assert res.done and res.outcome_reward["judge"] == 0.0 and broken.judge_stats()["failures"] == 1
    plain = EnvWorker(str(demo_index_dir), {"max_turns": 2})
    plain.reset(["e"], [qs[0]])
    assert "judge" not in plain.step(["e"], ["<answer>x</answer>"])[0].outcome_reward
    assert plain.judge_stats() == {"instance_id": plain.ping()}


def test_forked_episodes_keep_the_evaluation_flag(demo_index_dir: Path, demo_paths: dict) -> None:
    q = next(q for q in load_questions(demo_paths["eval"], limit=100) if q["hops"] == 1)
    rec = Recorder()
    w = EnvWorker(str(demo_index_dir), {"max_turns": 3}, judge=JudgeClient([rec], outcome_weight=1.0))
    w.reset(["p", "j"], [{**q, "judge": False}, q])
    assert w.fork("p", ["p1"]) == 1 and w.fork("j", ["j1"]) == 1
    w.step(["p1", "j1"], ["<answer>x</answer>", "<answer>x</answer>"])
    assert len(rec.batches) == 1 and len(rec.batches[0]) == 1  # only j1's answer
