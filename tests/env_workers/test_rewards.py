"""Tests of the MT-GRPO reward rubric (env_workers.rewards), values worked by hand."""

from __future__ import annotations

import pytest

from env_workers.rewards import (
    OUTCOME_REWARD_KEYS,
    TURN_REWARD_KEYS,
    RewardWeights,
    contains_answer,
    exact_match,
    format_fraction,
    normalize_answer,
    outcome_reward,
    token_f1,
    total,
    turn_reward,
    turn_format_ok,
    turn_xml_score,
    xml_fraction,
)

GOOD_TOOL = '<reasoning>look it up</reasoning>\n<tool>{"name": "wiki_search", "args": {"query": "Karo"}}</tool>'
GOOD_ANSWER = "<reasoning>found it</reasoning> <answer>Ralomek</answer>"
BARE_ANSWER = "<answer>Ralomek</answer>"  # no reasoning
DOUBLE_REASONING = "<reasoning>a</reasoning><reasoning>b</reasoning><answer>x</answer>"


def test_defaults_are_the_papers() -> None:
    w = RewardWeights()
    assert w.to_dict() == {"tool_execution": 0.2, "result_contains_answer": 0.5, "exact_match": 1.0,
                           "answer_contains": 0.5, "format": 0.2, "xml": 0.2, "f1": 0.0}


def test_normalisation() -> None:
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer(None) == ""
    assert exact_match("the Ralomek.", ["Ralomek"])
    assert not exact_match("the Ralomek.", ["Ralomek"], mode="strict")
    assert exact_match("  RALOMEK ", ["ralomek"], mode="strict")
    assert not exact_match("", [""])
    assert not exact_match(None, ["x"])


def test_contains_is_whole_token() -> None:
    assert contains_answer("He was born in 1873.", ["1873"])
    assert not contains_answer("He was born in 18734.", ["1873"])
    assert contains_answer("plays the grey harp", ["gray", "grey"])
    assert not contains_answer("", ["x"])
    assert not contains_answer("abc", [])
    assert not contains_answer(123, ["123"])


def test_token_f1() -> None:
    # pred "new york city" vs gold "new york": overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("New York City", ["new york", "nyc"]) == pytest.approx(0.8)
    assert token_f1("Boston", ["new york"]) == 0.0
    assert token_f1(None, ["x"]) == 0.0


def test_turn_format_and_xml_scores() -> None:
    assert turn_format_ok(GOOD_TOOL) and turn_format_ok(GOOD_ANSWER)
    assert not turn_format_ok(BARE_ANSWER)
    assert not turn_format_ok(GOOD_ANSWER + " trailing words")
    assert turn_xml_score(GOOD_TOOL) == 1.0
    assert turn_xml_score(BARE_ANSWER) == 0.5      # reasoning missing, answer fine
    assert turn_xml_score(DOUBLE_REASONING) == 0.5  # reasoning twice, answer fine
    assert turn_xml_score("plain text") == 0.0
    assert turn_format_ok("<think>a</think><search>q</search>", "search_r1")
    assert turn_xml_score("<think>a</think><search>q</search>", "search_r1") == 1.0
    assert format_fraction([]) == 0.0 and xml_fraction([]) == 0.0


def test_turn_reward_values() -> None:
    ok = turn_reward(tool_called=True, tool_success=True, result_text="Ralomek was founded in 1204.",
                     answers=["1204"])
    assert ok == {"tool_execution": 0.2, "result_contains_answer": 0.5}
    miss = turn_reward(tool_called=True, tool_success=True, result_text="nothing here", answers=["1204"])
    assert miss == {"tool_execution": 0.2, "result_contains_answer": 0.0}
    failed = turn_reward(tool_called=True, tool_success=False, result_text="Error: 1204", answers=["1204"])
    assert failed == {"tool_execution": 0.0, "result_contains_answer": 0.0}
    none = turn_reward(tool_called=False, tool_success=False, result_text="1204", answers=["1204"])
    assert none == {"tool_execution": 0.0, "result_contains_answer": 0.0}
    assert tuple(ok) == TURN_REWARD_KEYS
    w = RewardWeights(tool_execution=1.0, result_contains_answer=2.0)
    assert total(turn_reward(tool_called=True, tool_success=True, result_text="1204", answers=["1204"],
                             weights=w)) == 3.0


def test_outcome_reward_two_turn_episode() -> None:
    # Turn 1 well formed (format 1, xml 1); turn 2 lacks reasoning (format 0, xml 0.5).
    out = outcome_reward(answer="Ralomek", answers=["Ralomek"], assistant_turns=[GOOD_TOOL, BARE_ANSWER])
    assert tuple(out) == OUTCOME_REWARD_KEYS
    assert out["exact_match"] == 1.0
    assert out["answer_contains"] == 0.5
    assert out["f1"] == 0.0                                   # weight 0 by default
    assert out["format"] == pytest.approx(0.2 * 1 / 2)        # 0.1
    assert out["xml"] == pytest.approx(0.2 * (1.0 + 0.5) / 2)  # 0.15
    assert total(out) == pytest.approx(1.75)


def test_outcome_reward_partial_and_missing_answers() -> None:
    # "city of Ralomek" contains the alias but is not equal to it.
    out = outcome_reward(answer="the city of Ralomek", answers=["Ralomek"], assistant_turns=[GOOD_ANSWER],
                         weights=RewardWeights(f1=1.0))
    assert out["exact_match"] == 0.0 and out["answer_contains"] == 0.5
    # tokens "city of ralomek" ("the" dropped): P = 1/3, R = 1, F1 = 2PR/(P+R) = 0.5
    assert out["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert out["format"] == pytest.approx(0.2) and out["xml"] == pytest.approx(0.2)
    none = outcome_reward(answer=None, answers=["Ralomek"], assistant_turns=[GOOD_TOOL, GOOD_TOOL])
    assert none["exact_match"] == none["answer_contains"] == none["f1"] == 0.0
    assert none["format"] == pytest.approx(0.2) and none["xml"] == pytest.approx(0.2)


def test_rewards_never_raise_on_junk() -> None:
    for junk in (None, 3, b"bytes", ["list"], {"d": 1}, "\x00" * 10, "<reasoning>" * 10_000):
        out = outcome_reward(answer=junk, answers=junk, assistant_turns=junk)  # type: ignore[arg-type]
        assert set(out) == set(OUTCOME_REWARD_KEYS)
        assert all(isinstance(v, float) for v in out.values())
        tr = turn_reward(tool_called=True, tool_success=True, result_text=junk, answers=junk)
        assert set(tr) == set(TURN_REWARD_KEYS)
