"""Tests of EnvWorker (env_workers.worker), directly and as a Ray actor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from env_workers.demo_data import load_questions
from env_workers.worker import EnvWorker


def search(query: str) -> str:
    return "<reasoning>r</reasoning><tool>" + json.dumps({"name": "wiki_search", "args": {"query": query}}) + "</tool>"


@pytest.fixture(scope="module")
def questions(demo_paths: dict[str, Path]) -> list[dict]:
    return [q for q in load_questions(demo_paths["eval"], limit=200) if q["attribute"] == "city"][:3]


def test_worker_runs_many_episodes(demo_index_dir: Path, questions: list[dict]) -> None:
    w = EnvWorker(str(demo_index_dir), {"max_turns": 2, "top_k": 1})
    prompts = w.reset(["a", "b", "c"], questions)
    assert [p[1]["content"] for p in prompts] == [q["question"] for q in questions]
    assert w.num_live() == 3
    res = w.step(["a", "b", "c"], [search(q["chain"][0]) for q in questions])
    assert all(not r.done and r.turn_reward["result_contains_answer"] == 0.5 for r in res)
    res2 = w.step(["b", "a"], [f"<answer>{questions[1]['answers'][0]}</answer>", "<answer>wrong</answer>"])
    assert [r.done for r in res2] == [True, True]
    assert res2[0].outcome_reward["exact_match"] == 1.0 and res2[1].outcome_reward["exact_match"] == 0.0
    assert w.num_live() == 1  # finished episodes are released
    w.close(["c", "never-existed"])
    assert w.num_live() == 0


def test_unknown_and_duplicate_ids_get_error_results(demo_index_dir: Path, questions: list[dict]) -> None:
    w = EnvWorker(str(demo_index_dir), {})
    w.reset(["x"], questions[:1])
    res = w.step(["ghost", "x", "x", None], [search("a"), search(questions[0]["chain"][0]), "dup", "n"])  # type: ignore[list-item]
    assert res[0].done and "unknown" in res[0].info["error"] and res[0].outcome_reward is None
    assert not res[1].done and res[1].info["tool_success"]
    assert res[2].done and "twice" in res[2].info["error"]
    assert res[3].done and "unknown" in res[3].info["error"]
    assert w.num_live() == 1


def test_worker_rejects_bad_env_kwargs(demo_index_dir: Path) -> None:
    with pytest.raises(TypeError):
        EnvWorker(str(demo_index_dir), {"no_such_option": 1})


def test_worker_as_ray_actor(demo_index_dir: Path, questions: list[dict], ray_session) -> None:
    ray = ray_session
    actor = ray.remote(EnvWorker).options(num_cpus=0).remote(str(demo_index_dir), {"max_turns": 2})
    q = questions[0]
    prompts = ray.get(actor.reset.remote(["e1"], [q]))
    assert prompts[0][1]["content"] == q["question"]
    [r1] = ray.get(actor.step.remote(["e1"], [search(q["chain"][0])]))
    assert not r1.done and r1.info["tool_success"] and q["chain"][0] in r1.observation_text
    [r2] = ray.get(actor.step.remote(["e1"], [f"<reasoning>r</reasoning><answer>{q['answers'][0]}</answer>"]))
    assert r2.done and r2.outcome_reward["exact_match"] == 1.0
    assert ray.get(actor.num_live.remote()) == 0
    ray.kill(actor)
