"""Held-out summaries: the multi-hop figures (the second search) and when the held-out curve has a point."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from learner.evaluation import curve_point_due, eval_metrics, multi_hop_summary, summarize_episodes
from tests.learner.test_experiment import BASE


def _ep(air: bool, calls: int, ok: int, em: float) -> dict:
    return {"answer_in_result": air, "tool_calls": calls, "tool_successes": ok, "exact_match": em, "turns": calls + 1}


def test_multi_hop_summary_counts_only_questions_of_two_or_more_hops():
    episodes = [_ep(True, 1, 1, 1.0),    # one-hop: left out
                _ep(True, 2, 2, 1.0),    # two-hop, second search found the city: counted as correct
                _ep(False, 1, 1, 0.0),   # two-hop, one search only
                _ep(False, 3, 2, 0.0)]   # two-hop, three calls of which two executed
    questions = [{"hops": 1}, {"hops": 2}, {"hops": 2}, {"hops": 2}]
    s = multi_hop_summary(episodes, questions)
    assert s == {"multi_hop_answer_in_result": pytest.approx(1 / 3), "multi_hop_exact_match": pytest.approx(1 / 3),
                 "multi_hop_searches": pytest.approx(2.0), "multi_hop_two_searches": pytest.approx(2 / 3),
                 "multi_hop_questions": 3.0}
    # logged as eval/multi_hop/* next to the whole-set figures
    m = eval_metrics({**summarize_episodes(episodes), **s})
    assert m["eval/multi_hop/answer_in_result/rate"] == pytest.approx(1 / 3)
    assert m["eval/multi_hop/searches/mean"] == pytest.approx(2.0)
    assert m["eval/answer_in_result/rate"] == pytest.approx(0.5)


def test_multi_hop_summary_is_empty_without_multi_hop_questions_and_rejects_a_mismatch():
    assert multi_hop_summary([_ep(True, 1, 1, 1.0)], [{"hops": 1}]) == {}
    assert multi_hop_summary([_ep(True, 1, 1, 1.0)], [{}]) == {}  # no hops column: one hop
    with pytest.raises(ValueError, match="2 episodes for 1 questions"):
        multi_hop_summary([_ep(True, 1, 1, 1.0)] * 2, [{"hops": 2}])


def test_eval_curve_points_every_k_steps_at_the_last_and_at_the_extra_steps():
    ev = load_config(BASE, ["eval.every_steps=5", "eval.extra_steps=[1, 2]"]).eval
    assert [s for s in range(1, 13) if curve_point_due(ev.every_steps, ev.extra_steps, s, 12)] == [1, 2, 5, 10, 12]
    assert not any(curve_point_due(0, [], s, 12) for s in range(1, 13))  # every_steps 0: before/after only


@pytest.mark.parametrize("overrides,rule", [
    (["eval.every_steps=5", "eval.extra_steps=[0]"], "must be a list of steps >= 1"),
    (["eval.extra_steps=[1]"], "needs eval.every_steps > 0"),
    (["eval.every_steps=5", "eval.extra_steps=[1.5]"], "must be an integer"),
])
def test_extra_steps_errors_name_the_field_and_the_rule(overrides, rule):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, overrides)
    assert "eval.extra_steps" in str(e.value) and rule in str(e.value), str(e.value)
