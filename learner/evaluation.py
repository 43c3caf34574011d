"""Episode summaries and what is computed from them: a step's ``rollout/*`` and throughput metrics, the eval
table and the learning-curve plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from common import metrics as M
from common import schema as S

log = logging.getLogger(__name__)

SAMPLED_KEY, GREEDY_KEY = "trained", "trained_greedy"  # eval.json: the trained policy sampled at the training
# temperature, and greedy (eval.greedy); "warm_start" / "warm_start_greedy" for the starting policy
EVAL_KEYS = ("exact_match", "tool_success", "answer_in_result", "format", "turns", "truncated")
# held-out summary keys over the questions of two or more hops only (multi-hop task, :func:`multi_hop_summary`)
MULTI_HOP_KEYS = ("multi_hop_answer_in_result", "multi_hop_exact_match", "multi_hop_searches",
                  "multi_hop_two_searches")


def episode_summaries(table) -> list[dict[str, Any]]:
    """Per-episode summaries (the keys :func:`summarize_episodes` reads) of the complete episodes in an
    Arrow table of transitions, e.g. the batch a learner step trained on; ordered by episode id.

    The same fields as the rollout worker's own summaries: turn and outcome rewards, tool calls and
    successes, whether some search result held an answer, exact match and format (outcome components
    of the last turn), truncation, turns and action tokens; with the judge on, the judge's share of the
    turn and outcome rewards (``judge_turn_reward``, ``judge_outcome_reward``).
    """
    import pyarrow.compute as pc

    names = (S.EPISODE_ID, S.GROUP_ID, S.TURN_INDEX, S.TURN_REWARD, S.OUTCOME_REWARD, S.OUTCOME_REWARD_COMPONENTS,
             S.TURN_REWARD_COMPONENTS, S.IS_LAST_TURN, S.TRUNCATED, S.TOOL_CALLED, S.TOOL_SUCCESS, S.RESULT_CONTAINS_ANSWER)
    cols = {n: table.column(n).to_pylist() for n in names}
    n_actions = pc.list_value_length(table.column(S.ACTION_TOKEN_IDS)).to_pylist()
    out: dict[int, dict[str, Any]] = {}
    for i, eid in enumerate(cols[S.EPISODE_ID]):
        s = out.setdefault(eid, {"episode_id": eid, "group_id": cols[S.GROUP_ID][i], "turns": 0, "tool_calls": 0,
                                 "tool_successes": 0, "answer_in_result": False, "turn_reward": 0.0,
                                 "action_tokens": 0})
        s["turns"] = max(s["turns"], cols[S.TURN_INDEX][i] + 1)
        s["tool_calls"] += int(cols[S.TOOL_CALLED][i])
        s["tool_successes"] += int(cols[S.TOOL_SUCCESS][i])
        s["answer_in_result"] = s["answer_in_result"] or bool(cols[S.RESULT_CONTAINS_ANSWER][i])
        s["turn_reward"] += float(cols[S.TURN_REWARD][i])
        s["action_tokens"] += int(n_actions[i] or 0)
        turn_comps = S.components_to_dict(cols[S.TURN_REWARD_COMPONENTS][i])
        if "judge" in turn_comps:  # judge.turn_weight x the judge's score of this search turn
            s["judge_turn_reward"] = s.get("judge_turn_reward", 0.0) + turn_comps["judge"]
        if cols[S.IS_LAST_TURN][i]:
            comps = S.components_to_dict(cols[S.OUTCOME_REWARD_COMPONENTS][i])
            if "judge" in comps:
                s["judge_outcome_reward"] = comps["judge"]
            s["outcome_reward"] = float(cols[S.OUTCOME_REWARD][i])
            s["exact_match"] = float(comps.get("exact_match", 0.0) > 0)
            s["format"] = float(comps.get("format", 0.0))
            s["truncated"] = bool(cols[S.TRUNCATED][i])
    return [out[e] for e in sorted(out)]


def summarize_episodes(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Fractions over episodes.

    ``tool_success``: the episode called the tool at least once and every call executed.
    ``answer_in_result``: some search result of the episode contained an answer alias.
    ``exact_match``: the final answer matched an alias. ``format``: mean format reward.
    """
    n = max(1, len(episodes))
    return {
        "exact_match": sum(e.get("exact_match", 0.0) for e in episodes) / n,
        "tool_success": sum(1.0 for e in episodes
                            if e.get("tool_calls", 0) > 0 and e["tool_successes"] == e["tool_calls"]) / n,
        "answer_in_result": sum(float(bool(e.get("answer_in_result"))) for e in episodes) / n,
        "format": sum(e.get("format", 0.0) for e in episodes) / n,
        "turns": sum(e.get("turns", 0) for e in episodes) / n,
        "truncated": sum(float(bool(e.get("truncated"))) for e in episodes) / n,
        "episodes": float(len(episodes)),
    }


def multi_hop_summary(episodes: list[dict[str, Any]], questions: list[dict[str, Any]]) -> dict[str, float]:
    """The held-out figures over the questions of two or more hops (``questions[i]`` is episode i's), or {}.

    ``multi_hop_answer_in_result``: some search result held an answer alias. On the demo data the answer of a
    two-hop question ("In which country is the home city of X?") is only in the bridge entity's article (the
    city's), which the question does not name: it is the share of episodes that made a correct second search.
    ``multi_hop_searches``: mean tool calls; ``multi_hop_two_searches``: share with at least two executed ones.
    """
    if len(episodes) != len(questions):
        raise ValueError(f"{len(episodes)} episodes for {len(questions)} questions")
    multi = [e for e, q in zip(episodes, questions) if int(q.get("hops") or 1) >= 2]
    if not multi:
        return {}
    n = len(multi)
    return {
        "multi_hop_answer_in_result": sum(float(bool(e.get("answer_in_result"))) for e in multi) / n,
        "multi_hop_exact_match": sum(e.get("exact_match", 0.0) for e in multi) / n,
        "multi_hop_searches": sum(e.get("tool_calls", 0) for e in multi) / n,
        "multi_hop_two_searches": sum(1.0 for e in multi if e.get("tool_successes", 0) >= 2) / n,
        "multi_hop_questions": float(n),
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per evaluated policy."""
    cols = ("exact_match", "tool_success", "answer_in_result", "format")
    header = f"{'policy':<20}" + "".join(f"{c:>18}" for c in cols)
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"{name:<20}" + "".join(f"{r.get(c, float('nan')):>18.3f}" for c in cols))
    return "\n".join(lines)


def plot_learning_curves(metrics_path: str | Path, out_path: str | Path,
                         keys: tuple[str, ...] | None = None) -> Path | None:
    """PNG of reward components and rates against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or (M.REWARD_TOTAL, M.ANSWER_IN_RESULT, M.EXACT_MATCH, M.TOOL_SUCCESS)
    if not Path(metrics_path).exists():  # a run with learner.total_steps=0 logs no step
        return None
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if M.REWARD_TOTAL in r]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        xs = [r["step"] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        ax.plot(xs, ys, lw=1, alpha=0.4)
        if len(ys) >= 5:  # moving average
            w = 5
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=2)
        held_out = {M.ANSWER_IN_RESULT: M.EVAL_ANSWER_IN_RESULT, M.EXACT_MATCH: M.EVAL_EXACT_MATCH,
                    M.TOOL_SUCCESS: M.EVAL_TOOL_SUCCESS, M.AGENT_SUCCESS: M.EVAL_SUCCESS,
                    M.REWARD_TOTAL: M.EVAL_RETURN}.get(key)
        pts = [(r["step"], r[held_out]) for r in rows if held_out in r]  # eval.every_steps: the held-out curve
        if pts:
            ax.plot(*zip(*pts), "o-", lw=1.5, ms=3, color="black", label="held out")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def episode_metrics(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Reward and task metrics (``rollout/*``) of episode summaries: those of the batch a step trained on."""
    n = max(1, len(episodes))
    s = summarize_episodes(episodes)
    calls = sum(e.get("tool_calls", 0) for e in episodes)
    judged = {}
    for key, name in (("judge_turn_reward", M.REWARD_JUDGE_TURN), ("judge_outcome_reward", M.REWARD_JUDGE_OUTCOME)):
        if any(key in e for e in episodes):  # judge.enabled: the judge's part of the rewards trained on
            judged[name] = sum(e.get(key, 0.0) for e in episodes) / n
    return judged | {
        M.REWARD_TURN: sum(e.get("turn_reward", 0.0) for e in episodes) / n,
        M.REWARD_OUTCOME: sum(e.get("outcome_reward", 0.0) for e in episodes) / n,
        M.REWARD_TOTAL: sum(e.get("turn_reward", 0.0) + e.get("outcome_reward", 0.0) for e in episodes) / n,
        M.TOOL_SUCCESS: sum(e.get("tool_successes", 0) for e in episodes) / max(1, calls),
        M.TOOL_CALLED: sum(1.0 for e in episodes if e.get("tool_calls", 0) > 0) / n,
        M.ANSWER_IN_RESULT: s["answer_in_result"], M.EXACT_MATCH: s["exact_match"], M.FORMAT_SCORE: s["format"],
        M.TRUNCATED: s["truncated"], M.TURNS_MEAN: s["turns"],
        M.ACTION_TOKENS_MEAN: sum(e.get("action_tokens", 0) for e in episodes) / n,
    }


def generation_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Throughput metrics of ``RolloutWorker.run`` results (one, or several merged by ``merge_rollouts``)."""
    reused = result.get("reused_tokens", 0)
    return {
        M.TOKENS_PER_S: result["action_tokens"] / max(result["seconds"], 1e-9),
        M.TIME_ROLLOUT: result["seconds"],
        M.ROLLOUT_ABORTED_EPISODES: float(result.get("aborted_episodes", 0)),
        M.ROLLOUT_MIXED_VERSION_EPISODES: float(result.get("mixed_version_episodes", 0)),
        M.ROLLOUT_KV_REUSE: reused / max(1, reused + result.get("prefilled_tokens", 0)),
        M.ROLLOUT_FORKED_EPISODES: float(result.get("forked_episodes", 0)),
        M.ROLLOUT_GENERATED_TOKENS: float(result["action_tokens"]),
    }


def curve_point_due(every_steps: int, extra_steps: list[int], step: int, last: int) -> bool:
    """Whether the held-out curve has a point after training step ``step`` of ``last``: every
    ``eval.every_steps`` steps, at the last step, and at ``eval.extra_steps`` (0 every_steps: never)."""
    return bool(every_steps) and (step % every_steps == 0 or step == last or step in extra_steps)


def eval_metrics(summary: dict[str, float]) -> dict[str, float]:
    """A held-out evaluation's summary (:func:`summarize_episodes`) as ``eval/*`` step metrics."""
    names = {"exact_match": M.EVAL_EXACT_MATCH, "tool_success": M.EVAL_TOOL_SUCCESS,
             "answer_in_result": M.EVAL_ANSWER_IN_RESULT, "format": M.EVAL_FORMAT, "turns": M.EVAL_TURNS,
             "truncated": M.EVAL_TRUNCATED, "multi_hop_answer_in_result": M.EVAL_MULTI_HOP_ANSWER_IN_RESULT,
             "multi_hop_searches": M.EVAL_MULTI_HOP_SEARCHES}
    return {names[k]: float(v) for k, v in summary.items() if k in names}
