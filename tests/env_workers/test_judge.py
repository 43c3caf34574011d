"""The judge's text side (env_workers.judge: score parser, prompts, verdict maths) and its model
(env_workers.judge_model.JudgeActor) on a tiny real model, in both modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from env_workers.judge import (
    OUTCOME_TEMPLATE,
    TURN_TEMPLATE,
    check_template,
    judge_component,
    likelihood_score,
    parse_score,
    prompt_ids,
    render,
    verdict_ids,
)
from env_workers.judge_model import JudgeActor


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


def test_likelihood_score_is_the_renormalised_verdict_probability() -> None:
    assert likelihood_score(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert likelihood_score(-1.0, -1.0) == pytest.approx(0.5)
    assert likelihood_score(float("-inf"), -2.0) == 0.0 and likelihood_score(-2.0, float("-inf")) == 1.0
    assert likelihood_score(float("-inf"), float("-inf")) == 0.0
    assert likelihood_score(-1000.0, 0.0) == 0.0  # no overflow


def test_prompt_is_rendered_bounded_and_literal(tiny_policy: Path) -> None:
    from common.modeling import load_tokenizer

    tok = load_tokenizer(tiny_policy)
    text = render(OUTCOME_TEMPLATE, {"question": "Q?", "answers": ["A", "a2"], "response": "{question} " + "y" * 5000},
                  max_field_chars=300)
    assert "Question: Q?" in text and "Reference answer: A; a2" in text and text.endswith("Answer yes or no.")
    assert "{question} " in text  # braces in model output stay literal
    assert len(text) < 300 + len(OUTCOME_TEMPLATE) + 20
    assert render(TURN_TEMPLATE, {}, 10).startswith("Search result: \nQuestion: \n")  # missing fields are empty
    ids = prompt_ids(tok, text, max_prompt_tokens=40)
    assert len(ids) == 40 and ids == prompt_ids(tok, text, 10_000)[-40:]  # the tail (the instruction) is kept


def test_bad_templates_and_verdicts_are_rejected(tiny_policy: Path) -> None:
    from common.modeling import load_tokenizer

    with pytest.raises(ValueError, match="unknown placeholder"):
        check_template("{question} {secret}", frozenset({"question"}), "judge.outcome_template")
    with pytest.raises(ValueError, match="outcome_template"):
        check_template("{question", frozenset({"question"}), "judge.outcome_template")
    tok = load_tokenizer(tiny_policy)
    with pytest.raises(ValueError, match="different tokens"):
        verdict_ids(tok, "yes", "yes")


@pytest.fixture(scope="module")
def likelihood_judge(tiny_policy: Path) -> JudgeActor:
    return JudgeActor(str(tiny_policy), mode="likelihood", max_batch_tokens=2048)


def test_likelihood_mode_equals_one_full_forward_per_prompt(likelihood_judge: JudgeActor) -> None:
    """Batched, right-padded, sorted scoring gives each prompt the score of its own unpadded forward."""
    import torch

    j = likelihood_judge
    prompts = ["Question: who?\nSearch result: Karo Velmin is a baker.", "short", "x " * 200,
               render(TURN_TEMPLATE, {"question": "Where is Karo from?", "observation": "Ralomek"}, 100)]
    got = j.score(prompts)
    assert len(got["scores"]) == 4 and got["seconds"] > 0
    for p, s in zip(prompts, got["scores"]):
        ids = torch.tensor([prompt_ids(j.tokenizer, p, j.max_prompt_tokens)])
        with torch.no_grad():
            logp = torch.log_softmax(j.model(input_ids=ids).logits[0, -1].float(), -1)
        assert s == pytest.approx(likelihood_score(float(logp[j.yes_id]), float(logp[j.no_id])), abs=1e-5)
    assert j.score(prompts[1:2])["scores"][0] == pytest.approx(got["scores"][1], abs=1e-6)  # batch-independent
    assert j.score([]) == {"scores": [], "seconds": pytest.approx(0.0, abs=1.0)}
    assert j.stats()["scored"] == 5.0


def test_generative_mode_parses_untrusted_replies_reproducibly(tiny_policy: Path) -> None:
    j = JudgeActor(str(tiny_policy), mode="generative", max_new_tokens=6, temperature=1.0)
    prompts = ["Who wrote Hamlet? Answer yes or no.", "{not json} </answer> \x00", "x" * 50_000]
    a, b = j.score(prompts)["scores"], j.score(prompts)["scores"]
    assert a == b and len(a) == 3 and all(0.0 <= s <= 1.0 for s in a)  # seeded by the prompt
    replies = j.replies(prompts)
    assert [parse_score(r) for r in replies] == a  # the score is what the parser reads from the critique


def test_judge_actor_rejects_bad_settings(tiny_policy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        JudgeActor(str(tmp_path))  # a directory without a model
    with pytest.raises(ValueError, match="mode"):
        JudgeActor(str(tiny_policy), mode="vibes")
    with pytest.raises(ValueError, match="different tokens"):
        JudgeActor(str(tiny_policy), yes_token="no")
