"""Tests of one episode of WikiSearchEnv (env_workers.env)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from env_workers.env import DEFAULT_SYSTEM_PROMPT, WikiSearchEnv, step_batch
from env_workers.demo_data import load_questions
from env_workers.index import BM25Index
from tests.env_workers.test_protocol import MALFORMED

R = "<reasoning>need to search</reasoning>\n"


def search(query: str) -> str:
    return R + "<tool>" + json.dumps({"name": "wiki_search", "args": {"query": query}}) + "</tool>"


def answer(text: str) -> str:
    return f"<reasoning>done</reasoning>\n<answer>{text}</answer>"


@pytest.fixture(scope="module")
def questions(demo_paths: dict[str, Path]) -> list[dict]:
    return load_questions(demo_paths["eval"], limit=400)


def _one(questions: list[dict], attribute: str) -> dict:
    return next(q for q in questions if q["attribute"] == attribute)


def test_reset_gives_system_and_user(demo_index: BM25Index, questions: list[dict]) -> None:
    q = questions[0]
    msgs = WikiSearchEnv(demo_index).reset(q)
    assert msgs == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q["question"]}]
    assert "wiki_search" in DEFAULT_SYSTEM_PROMPT and "<answer>" in DEFAULT_SYSTEM_PROMPT


def test_full_two_turn_episode(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "birth_year")
    env = WikiSearchEnv(demo_index)
    env.reset(q)
    person = q["chain"][0]
    r1 = env.step(search(person))
    assert not r1.done and r1.outcome_reward is None
    assert r1.observation_text.startswith(f"<result>\n{person}\n{person} is ")
    assert r1.observation_text.endswith("\n</result>")
    assert r1.turn_reward == {"tool_execution": 0.2, "result_contains_answer": 0.5}
    assert r1.info["tool_called"] and r1.info["tool_success"] and r1.info["result_contains_answer"]
    assert r1.info["query"] == person and r1.info["error"] is None and not r1.info["truncated"]
    r2 = env.step(answer(q["answers"][0]))
    assert r2.done and r2.observation_text == "" and not r2.info["truncated"]
    assert r2.turn_reward == {"tool_execution": 0.0, "result_contains_answer": 0.0}
    assert r2.info["answer"] == q["answers"][0]
    # Both turns well formed: 1.0 + 0.5 + 0.2 + 0.2.
    assert r2.outcome_reward == pytest.approx({"exact_match": 1.0, "answer_contains": 0.5, "f1": 0.0,
                                              "format": 0.2, "xml": 0.2})
    with pytest.raises(RuntimeError):
        env.step(answer("again"))


def test_wrong_search_and_wrong_answer(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "colour")
    env = WikiSearchEnv(demo_index)
    env.reset(q)
    r1 = env.step(search("zzqx unknownword"))
    assert r1.observation_text == "<result>\nNo results found.\n</result>"
    assert r1.turn_reward == {"tool_execution": 0.2, "result_contains_answer": 0.0}
    r2 = env.step("<answer>not a colour</answer>")  # no reasoning tag in turn 2
    assert r2.outcome_reward == pytest.approx({"exact_match": 0.0, "answer_contains": 0.0, "f1": 0.0,
                                              "format": 0.1, "xml": 0.15})


def test_truncated_episode(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "country")  # two hops: person, then city
    env = WikiSearchEnv(demo_index, max_turns=2)
    env.reset(q)
    person, city = q["chain"]
    r1 = env.step(search(person))
    assert not r1.done and r1.turn_reward["result_contains_answer"] == 0.0  # country not in person article
    r2 = env.step(search(city))
    assert r2.done and r2.info["truncated"] and r2.observation_text == ""
    assert r2.turn_reward == {"tool_execution": 0.2, "result_contains_answer": 0.5}  # city article names it
    assert r2.info["answer"] is None
    assert r2.outcome_reward == pytest.approx({"exact_match": 0.0, "answer_contains": 0.0, "f1": 0.0,
                                              "format": 0.2, "xml": 0.2})


def test_a_turn_marked_final_ends_as_the_max_turn_does(demo_index: BM25Index, questions: list[dict]) -> None:
    """A turn the caller marks final (the rollout's token budget is spent) is scored exactly as turn max_turns:
    the same truncation flag, turn reward and outcome (format terms included), whichever budget ran out."""
    q = _one(questions, "country")
    person, city = q["chain"]
    by_turns = WikiSearchEnv(demo_index, max_turns=2)
    by_tokens = WikiSearchEnv(demo_index, max_turns=5)
    for env in (by_turns, by_tokens):
        env.reset(q)
        assert not env.step(search(person)).done
    a = by_turns.step(search(city))
    [b] = step_batch([by_tokens], [search(city)], final=[True])
    assert b.done and b.info["truncated"] and b.observation_text == ""
    assert (b.turn_reward, b.outcome_reward, b.info) == (a.turn_reward, a.outcome_reward, a.info)
    assert b.outcome_reward["format"] == pytest.approx(0.2)  # the format terms count on this path too
    env = WikiSearchEnv(demo_index, max_turns=5)  # an answer on a final turn is an ordinary ending
    env.reset(q)
    [r] = step_batch([env], [answer(q["answers"][0])], final=[True])
    assert r.done and not r.info["truncated"] and r.outcome_reward["exact_match"] == 1.0
    with pytest.raises(ValueError, match="final flags"):
        step_batch([env], ["x"], final=[True, False])


def test_three_turn_two_hop_episode(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "city_founded")
    env = WikiSearchEnv(demo_index, max_turns=3)
    env.reset(q)
    assert not env.step(search(q["chain"][0])).done
    assert not env.step(search(q["chain"][1])).done
    r = env.step(answer(q["answers"][0]))
    assert r.done and not r.info["truncated"] and r.outcome_reward["exact_match"] == 1.0


def test_no_action_ends_the_episode(demo_index: BM25Index, questions: list[dict]) -> None:
    env = WikiSearchEnv(demo_index)
    env.reset(questions[0])
    r = env.step("I think the answer is obvious.")
    assert r.done and not r.info["truncated"] and not r.info["tool_called"]
    assert r.outcome_reward == {"exact_match": 0.0, "answer_contains": 0.0, "f1": 0.0, "format": 0.0, "xml": 0.0}


@pytest.mark.parametrize("case,text,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_tool_call_turn(demo_index: BM25Index, questions: list[dict], case: str, text: str,
                                  message: str) -> None:
    env = WikiSearchEnv(demo_index)
    env.reset(questions[0])
    r = env.step(text)
    assert not r.done and r.outcome_reward is None
    assert r.observation_text.startswith("<result>\nError: ") and message in r.observation_text
    assert r.turn_reward == {"tool_execution": 0.0, "result_contains_answer": 0.0}
    assert r.info["tool_called"] and not r.info["tool_success"] and message in r.info["error"]
    last = env.step(text)  # a malformed call on the last turn truncates the episode
    assert last.done and last.info["truncated"] and last.outcome_reward is not None


def test_step_batch_matches_single_steps(demo_index: BM25Index, questions: list[dict]) -> None:
    qs = questions[:6]
    actions = [search(q["chain"][0]) for q in qs[:4]] + [answer("x"), "<tool>{bad</tool>"]
    singles = []
    for q, a in zip(qs, actions):
        env = WikiSearchEnv(demo_index, top_k=2)
        env.reset(q)
        singles.append(env.step(a))
    envs = [WikiSearchEnv(demo_index, top_k=2) for _ in qs]
    for env, q in zip(envs, qs):
        env.reset(q)
    calls: list[int] = []
    original = demo_index.search

    def counting_search(queries, k=1):
        calls.append(len(queries))
        return original(queries, k=k)

    demo_index.search = counting_search  # type: ignore[method-assign]
    try:
        batched = step_batch(envs, actions)
    finally:
        del demo_index.search
    assert calls == [4]  # one batched call for the four searches
    assert batched == singles


def test_search_failure_becomes_error_observation(questions: list[dict]) -> None:
    class Broken:
        def search(self, queries, k=1):
            raise OSError("disk gone")

    env = WikiSearchEnv(Broken())  # type: ignore[arg-type]
    env.reset(questions[0])
    r = env.step(search("anything"))
    assert r.observation_text == "<result>\nError: search failed (OSError)\n</result>"
    assert not r.info["tool_success"] and r.turn_reward["tool_execution"] == 0.0


def test_search_r1_protocol_episode(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "instrument")
    env = WikiSearchEnv(demo_index, protocol="search_r1")
    assert "<search>" in env.reset(q)[0]["content"]
    r1 = env.step(f"<think>search</think><search>{q['chain'][0]}</search>")
    assert r1.observation_text.startswith("<information>\n") and r1.turn_reward["result_contains_answer"] == 0.5
    r2 = env.step(f"<think>ok</think><answer>{q['answers'][0]}</answer>")
    assert r2.outcome_reward["exact_match"] == 1.0 and r2.outcome_reward["format"] == pytest.approx(0.2)


def test_strict_answer_match(demo_index: BM25Index, questions: list[dict]) -> None:
    q = _one(questions, "occupation")
    for mode, expected in (("normalized", 1.0), ("strict", 0.0)):
        env = WikiSearchEnv(demo_index, answer_match=mode)
        env.reset(q)
        r = env.step(answer(f"a {q['answers'][0]}."))
        assert r.outcome_reward["exact_match"] == expected


def test_bad_config_is_rejected(demo_index: BM25Index) -> None:
    with pytest.raises(ValueError):
        WikiSearchEnv(demo_index, protocol="xml-rpc")
    with pytest.raises(ValueError):
        WikiSearchEnv(demo_index, max_turns=0)
    with pytest.raises(ValueError):
        WikiSearchEnv(demo_index, answer_match="fuzzy")  # type: ignore[arg-type]
