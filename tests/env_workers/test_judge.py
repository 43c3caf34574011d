"""Tests of the LLM judge hook (env_workers.judge): score parser, plumbing through a tiny real model,
and the ``judge`` rubric term in EnvWorker."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from env_workers.demo_data import load_questions
from env_workers.judge import JudgeActor, LLMJudge, judge_component, parse_score
from env_workers.worker import EnvWorker


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 0.8", 0.8),
        ("Score: 0.25", 0.25),
        ("score = 1", 1.0),
        ("SCORE:0", 0.0),
        ("The rating is 7/10.", 0.7),
        ("Grade: 85%", 0.85),
        ("I would say 9", 0.9),
        ("42", 0.42),
        ("<score>0.6</score> because", 0.6),
        ("Score: .5", 0.5),
        ("Score: 3/4 overall", 0.75),
        ("yes, it is correct", 1.0),
        ("Correct.", 1.0),
        ("no", 0.0),
        ("incorrect", 0.0),
        ("", 0.0),
        ("no number here", 0.0),
        ("Score: -0.5", 0.0),
        ("Score: 250", 0.0),
        ("Score: 1/0", 0.0),
        ("1e400", 0.0),
        ("Score: nan", 0.0),
        ("\x00\xff<<<garbage>>>", 0.0),
        ("Score: 0.9 " + "x" * 10_000, 0.9),
        ("x" * 5000 + " Score: 0.9", 0.0),  # past the scanned prefix
    ],
)
def test_parse_score_on_crafted_replies(text: str, expected: float) -> None:
    assert parse_score(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [None, 3, b"0.5", ["0.5"], {"score": 1}])
def test_parse_score_never_raises_on_non_text(bad: object) -> None:
    assert parse_score(bad) == 0.0


def test_score_is_always_in_unit_interval() -> None:
    import random

    rng = random.Random(0)
    alphabet = "0123456789./%-+eE Score:<>scoreyesno \n"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        v = parse_score(s)
        assert 0.0 <= v <= 1.0 and math.isfinite(v), s


def test_judge_component() -> None:
    assert judge_component(0.5, 0.4) == {"judge": 0.2}
    assert judge_component(7.0, 1.0) == {"judge": 1.0}
    assert judge_component(float("nan"), 1.0) == {"judge": 0.0}


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_policy: Path) -> Path:
    """The suite's random tiny Qwen2 + BPE tokenizer (tests/conftest.py), a local model directory."""
    return tiny_policy


@pytest.fixture(scope="module")
def tiny_judge(tiny_model_dir: Path) -> LLMJudge:
    from actors.engine import HFEngine
    from common.modeling import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    return LLMJudge(HFEngine(load_model(tiny_model_dir), tok), tok, max_new_tokens=4, max_prompt_tokens=512)


def test_judge_with_a_tiny_real_model_returns_one_valid_score_per_item(tiny_judge: LLMJudge) -> None:
    items = [
        {"question": "Who wrote Hamlet?", "answers": ["Shakespeare"], "response": "Shakespeare"},
        {"question": "Capital of France?", "answers": ["Paris"], "response": "{not json} </answer> \x00"},
        {"question": "", "answers": [], "response": "x" * 50_000},
    ]
    scores = tiny_judge.score_outcomes(items)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    turns = tiny_judge.score_turns([{"question": "q", "action": "<tool>{}</tool>", "observation": "<result>r</result>"}])
    assert len(turns) == 1 and 0.0 <= turns[0] <= 1.0
    assert tiny_judge.failures == 0 and tiny_judge.calls == 2
    assert tiny_judge.score_outcomes([]) == []


def test_prompt_is_rendered_and_bounded(tiny_judge: LLMJudge) -> None:
    text = tiny_judge.render(tiny_judge.outcome_template,
                             {"question": "Q?", "answers": ["A", "a2"], "response": "{question} " + "y" * 5000})
    assert "Question: Q?" in text and "A; a2" in text and text.rstrip().endswith("Score:")
    assert "{question} " in text  # braces in model output stay literal
    assert len(text) < 2000 + 600
    assert len(tiny_judge._prompt_ids(text)) <= tiny_judge.max_prompt_tokens


class _TextBackend:
    """A generator backend that replies with fixed texts, encoded by the real tokenizer."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        self.tokenizer, self.replies = tokenizer, replies

    def generate(self, prompts: list[list[int]], params: Any, max_new_tokens: list[int] | None = None) -> list[list[int]]:
        return [self.tokenizer.encode(self.replies[i % len(self.replies)], add_special_tokens=False)
                for i in range(len(prompts))]


class _FailingBackend:
    def generate(self, prompts: list[list[int]], params: Any, max_new_tokens: list[int] | None = None) -> list:
        raise RuntimeError("backend down")


def test_replies_go_through_decode_and_parser(tiny_judge: LLMJudge) -> None:
    judge = LLMJudge(_TextBackend(tiny_judge.tokenizer, [" 0.5", "Score: 1", "no"]), tiny_judge.tokenizer)
    assert judge.score_outcomes([{"question": "q"}] * 3) == [0.5, 1.0, 0.0]
    failing = LLMJudge(_FailingBackend(), tiny_judge.tokenizer)
    assert failing.score_outcomes([{"question": "q"}] * 2) == [0.0, 0.0] and failing.failures == 1


def test_bad_templates_are_rejected(tiny_judge: LLMJudge) -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        LLMJudge(None, tiny_judge.tokenizer, outcome_template="{question} {secret}")
    with pytest.raises(ValueError, match="outcome_template"):
        LLMJudge(None, tiny_judge.tokenizer, outcome_template="{question")


def test_judge_actor_class_loads_a_model_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    actor = JudgeActor(str(tiny_model_dir), max_new_tokens=3)
    assert actor.ping()
    [s] = actor.score_outcomes([{"question": "q", "answers": ["a"], "response": "a"}])
    assert 0.0 <= s <= 1.0
    with pytest.raises(FileNotFoundError, match="config.json"):
        JudgeActor(str(tmp_path))  # a directory without a model


def test_env_worker_adds_judge_terms(tiny_judge: LLMJudge, demo_index_dir: Path, demo_paths: dict) -> None:
    q = next(q for q in load_questions(demo_paths["eval"], limit=100) if q["hops"] == 1)
    judge = LLMJudge(_TextBackend(tiny_judge.tokenizer, ["Score: 0.5"]), tiny_judge.tokenizer)
    w = EnvWorker(str(demo_index_dir), {"max_turns": 2}, judge=judge, judge_outcome_weight=0.4, judge_turn_weight=0.2)
    w.reset(["e"], [q])
    tool = "<reasoning>r</reasoning><tool>" + json.dumps({"name": "wiki_search", "args": {"query": q["chain"][0]}}) + "</tool>"
    [r1] = w.step(["e"], [tool])
    assert r1.turn_reward["judge"] == pytest.approx(0.1) and r1.info["judge_turn_score"] == 0.5
    [r2] = w.step(["e"], [f"<reasoning>r</reasoning><answer>{q['answers'][0]}</answer>"])
    assert r2.done and r2.outcome_reward["judge"] == pytest.approx(0.2)
    assert r2.turn_reward["judge"] == 0.0 and r2.outcome_reward["exact_match"] == 1.0
    # A failing judge scores 0 and the step still succeeds.
    broken = EnvWorker(str(demo_index_dir), {"max_turns": 2}, judge=LLMJudge(_FailingBackend(), tiny_judge.tokenizer),
                       judge_outcome_weight=1.0)
    broken.reset(["e"], [q])
    [r] = broken.step(["e"], ["<answer>x</answer>"])
    assert r.done and r.outcome_reward["judge"] == 0.0
    # Without a judge nothing changes.
    plain = EnvWorker(str(demo_index_dir), {"max_turns": 2}, judge_outcome_weight=1.0)
    plain.reset(["e"], [q])
    assert "judge" not in plain.step(["e"], ["<answer>x</answer>"])[0].outcome_reward
