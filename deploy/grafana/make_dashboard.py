"""Build the turnrl Grafana dashboard (``deploy/grafana/dashboards/turnrl.json``) from the metric names.

    python deploy/grafana/make_dashboard.py           # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check   # exit 1 if the committed JSON is stale

Every turnrl series comes from ``common/metrics.py`` through ``prometheus_name``, so the dashboard,
the README and the code cannot drift apart (tests/deploy checks that the committed file equals
the generated one, and that a real Prometheus returns data for every expression).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import metrics as M  # noqa: E402

OUT = Path(__file__).resolve().parent / "dashboards" / "turnrl.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = '{run=~"$run"}'


def series(name: str) -> str:
    """The PromQL selector of a turnrl metric, restricted to the selected runs."""
    if name not in M.METRICS:
        raise KeyError(f"{name!r} is not declared in common/metrics.py")
    return M.prometheus_name(name) + RUN


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    min: float | None = None
    max: float | None = None
    right_axis: list[str] = field(default_factory=list)  # legends drawn against a right-hand axis
    width: int = 8


def turnrl(name: str, legend: str) -> tuple[str, str]:
    """A panel target: the metric's value, or for a duration histogram its mean per step over the interval."""
    if M.prometheus_kind(name) == "histogram":
        base = M.prometheus_name(name)
        expr = f"rate({base}_sum{RUN}[$__rate_interval]) / rate({base}_count{RUN}[$__rate_interval])"
        return expr, "{{run}} " + legend
    return series(name), "{{run}} " + legend


ROWS: list[tuple[str, list[Panel]]] = [
    ("Rewards and task success", [
        Panel("Reward components",
              "Mean reward per training episode: total = turn + outcome; turn = summed turn rewards "
              "(tool executed, answer in the search result); outcome = exact match, answer contained, "
              "format and XML terms; the format component alone.",
              [turnrl(M.REWARD_TOTAL, "total"), turnrl(M.REWARD_TURN, "turn"),
               turnrl(M.REWARD_OUTCOME, "outcome"), turnrl(M.FORMAT_SCORE, "format component")]),
        Panel("Tool success",
              "Share of tool calls that executed (parsed and searched), share of episodes that called the "
              "tool, and share whose search result contained an answer alias.",
              [turnrl(M.TOOL_SUCCESS, "tool calls executed"), turnrl(M.TOOL_CALLED, "episodes calling the tool"),
               turnrl(M.ANSWER_IN_RESULT, "answer in search result")], unit="percentunit", min=0, max=1),
        Panel("Exact match",
              "Share of training episodes whose final answer equals an answer alias after normalisation, and "
              "share cut at max turns or max tokens (truncated is not the same as wrong).",
              [turnrl(M.EXACT_MATCH, "exact match"), turnrl(M.TRUNCATED, "truncated")],
              unit="percentunit", min=0, max=1),
    ]),
    ("Credit assignment and policy update", [
        Panel("Per-turn advantage",
              "Mean and standard deviation of the advantage of each turn over the step's episodes. With "
              "MT-GRPO the search turn (0) gets c_T*norm(R^T) + c_O*norm(R^O) and the answer turn (1) norm(R^O): "
              "means sit near 0; a std collapsing to 0 means the groups stopped disagreeing.",
              [turnrl(M.ADV_TURN_MEAN.format(k=0), "turn 0 mean"), turnrl(M.ADV_TURN_STD.format(k=0), "turn 0 std"),
               turnrl(M.ADV_TURN_MEAN.format(k=1), "turn 1 mean"), turnrl(M.ADV_TURN_STD.format(k=1), "turn 1 std")]),
        Panel("KL, clip fraction, entropy",
              "Approximate KL between the behaviour and the updated policy, share of action tokens whose PPO "
              "ratio was clipped (left axis); mean token entropy of the policy (right axis).",
              [turnrl(M.KL, "KL"), turnrl(M.CLIP_FRAC, "clip fraction"), turnrl(M.ENTROPY, "entropy")],
              right_axis=["entropy"]),
        Panel("Off-policy: ratios and log-prob gap",
              "How far the rows trained on are from the learner: the largest PPO ratio of the step, the share of "
              "tokens the dual clip capped (algorithm.clip_ratio_c), the k3 KL, and the mean |learner - "
              "generator| log-prob of the sampled tokens before the update (numerics on-policy; plus one step of "
              "policy change at lag 1). Ratios in the tens with a rising k3 KL: the steps are too large for the lag.",
              [turnrl(M.RATIO_MAX, "ratio max"), turnrl(M.CLIP_FRAC_DUAL, "dual-clip fraction"),
               turnrl(M.KL_K3, "KL (k3)"), turnrl(M.LOGPROB_GAP_MEAN, "log-prob gap")],
              right_axis=["ratio max"]),
        Panel("Loss, gradient norm, learning rate",
              "Policy loss of the step (token-mean over the whole batch), global gradient norm before "
              "clipping (left axis) and the learning rate (right axis).",
              [turnrl(M.LOSS, "loss"), turnrl(M.GRAD_NORM, "grad norm"), turnrl(M.LR, "learning rate")],
              right_axis=["learning rate"]),
    ]),
    ("Throughput and pipeline", [
        Panel("Tokens/s",
              "Action tokens generated per second during the rollout phase, episodes consumed by the "
              "learner per second, and the share of each turn's history whose KV the generators reused "
              "instead of prefilling (session KV or vLLM prefix caching).",
              [turnrl(M.TOKENS_PER_S, "action tokens/s"),
               (f"rate({series(M.EPISODES_TOTAL)}[$__rate_interval])", "{{run}} episodes/s"),
               turnrl(M.ROLLOUT_KV_REUSE, "KV reuse fraction")],
              right_axis=["episodes/s", "KV reuse fraction"]),
        Panel("Step phase times",
              "Seconds per step in each phase of the loop (mean over the interval, from the duration "
              "histograms): rollout (generation + environment), advantages, DeepSpeed update, weight push, "
              "and the whole step.",
              [turnrl(M.TIME_ROLLOUT, "rollout"), turnrl(M.TIME_ADVANTAGE, "advantages"),
               turnrl(M.TIME_UPDATE, "update"), turnrl(M.TIME_SYNC, "weight push"), turnrl(M.TIME_STEP, "step")],
              unit="s", min=0),
        Panel("Learner work",
              "Token positions the learner's forward passes ran over per step (padding included; with "
              "learner.prefix_sharing each distinct prefix of a micro-batch once) against the batch's distinct "
              "(prefix, token) positions, the least any forward needs.",
              [turnrl(M.LEARNER_TOKENS, "tokens processed"), turnrl(M.LEARNER_UNIQUE_TOKENS, "distinct tokens")],
              min=0),
        Panel("Queue depth",
              "Replay queue contents: turns held, complete groups waiting for the learner, incomplete groups "
              "whose episodes are still running.",
              [turnrl(M.QUEUE_ROWS, "turns"), turnrl(M.QUEUE_GROUPS, "complete groups"),
               turnrl(M.QUEUE_GROUPS_IN_FLIGHT, "groups in flight")], min=0),
        Panel("Policy lag",
              "Weight versions between the policy that generated a turn and the learner that trains on it: "
              "mean and max over the turns handed out, the largest ever released, and groups dropped for "
              "exceeding queue.max_policy_lag.",
              [turnrl(M.POLICY_LAG_MEAN, "mean"), turnrl(M.POLICY_LAG_MAX, "max"),
               turnrl(M.POLICY_LAG_RELEASED_MAX, "largest released"),
               turnrl(M.QUEUE_DROPPED_STALE, "stale groups dropped")], min=0),
        Panel("Weight-push time",
              "Seconds to push the new weights from learner rank 0 to every generator (object store buckets), "
              "0 on steps without a push (learner.push_every).",
              [turnrl(M.TIME_SYNC, "weight push")], unit="s", min=0),
        Panel("Learner wait",
              "Share of wall time the learner spent blocked waiting for complete groups, and seconds producers "
              "spent blocked on a full queue.",
              [turnrl(M.QUEUE_LEARNER_IDLE, "learner idle fraction"),
               turnrl(M.QUEUE_PRODUCER_WAIT, "producer blocked s")], right_axis=["producer blocked s"]),
    ]),
    ("Judge (generative reward model; judge.enabled)", [
        Panel("Judge scores",
              "Mean judge score in [0, 1] of the step's judged search turns and final answers, and the judge's "
              "share of the rewards trained on (weight x score, per episode).",
              [turnrl(M.JUDGE_TURN_SCORE, "turn score"), turnrl(M.JUDGE_OUTCOME_SCORE, "outcome score"),
               turnrl(M.REWARD_JUDGE_TURN, "turn reward part"), turnrl(M.REWARD_JUDGE_OUTCOME, "outcome reward part")],
              min=0),
        Panel("Judge throughput and time",
              "Prompts the judge model scores per second of its own compute (left), and the seconds per step "
              "the env workers waited on it (right; compare with the rollout time).",
              [turnrl(M.JUDGE_THROUGHPUT, "prompts/s"), turnrl(M.TIME_JUDGE, "judge wait s"),
               turnrl(M.TIME_ROLLOUT, "rollout s")], right_axis=["judge wait s", "rollout s"], min=0),
        Panel("Judge requests, cache hits and failures",
              "Judge items per second: asked, answered from the env workers' cache, and scored 0 because the "
              "judge failed or timed out, and batches sent again because their judge actor had died.",
              [(f"rate({series(M.JUDGE_REQUESTS)}[$__rate_interval])", "{{run}} requests/s"),
               (f"rate({series(M.JUDGE_CACHE_HITS)}[$__rate_interval])", "{{run}} cache hits/s"),
               (f"rate({series(M.JUDGE_FAILURES)}[$__rate_interval])", "{{run}} failures/s"),
               (f"rate({series(M.JUDGE_RETRIES)}[$__rate_interval])", "{{run}} retries/s")], min=0),
    ]),
    ("Tensor agents (kind: tensor; the arm, Gymnasium envs)", [
        Panel("Agent success and sub-goals",
              "Share of the step's trained episodes the env calls a success (the arm: a basket), the arm's sub-goal "
              "rates (grasped, aimed at the hoop), and the held-out success every eval.every_steps.",
              [turnrl(M.AGENT_SUCCESS, "success"), turnrl(M.AGENT_SUBGOAL.format(name="grasped"), "grasped"),
               turnrl(M.AGENT_SUBGOAL.format(name="aimed"), "aimed"), turnrl(M.EVAL_SUCCESS, "held-out success")],
              min=0),
        Panel("Agent episode length and env errors",
              "Env steps and turns per trained episode, and env steps that raised so far (each ended its episode "
              "unscored; should stay 0).",
              [turnrl(M.AGENT_STEPS, "env steps"), turnrl(M.TURNS_MEAN, "turns"),
               turnrl(M.AGENT_ENV_ERRORS, "env errors")], right_axis=["env errors"], min=0),
    ]),
    ("Fault tolerance and cluster", [
        Panel("Actor restarts",
              "Ray restarts of the run's actors so far, by role (generators, env workers, learner ranks, "
              "rollout worker, replay queue, judge actors) and in total. A rising line means actors are crashing and being "
              "restarted (up to each role's max_restarts).",
              [turnrl(M.ACTOR_RESTARTS_ROLE.format(role=r), r) for r in M.ACTOR_ROLES]
              + [turnrl(M.ACTOR_RESTARTS, "total")], min=0),
        Panel("Ray actors by state",
              "Actors known to Ray's GCS by state (Ray's own metric, every job on the cluster).",
              [("sum by (State) (ray_gcs_actors_count)", "{{State}}")], min=0),
        Panel("Ray nodes: CPU and memory",
              "CPU utilisation of each Ray node (percent, left axis) and the share of its memory in use "
              "(right axis).",
              [("ray_node_cpu_utilization", "{{ip}} CPU %"),
               ("ray_node_mem_used / ray_node_mem_total", "{{ip}} memory used")],
              right_axis=["memory used"]),
    ]),
]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    overrides = [{"matcher": {"id": "byRegexp", "options": f".*{legend}$"},
                  "properties": [{"id": "custom.axisPlacement", "value": "right"}]} for legend in p.right_axis]
    defaults: dict = {"unit": p.unit, "custom": {"drawStyle": "line", "lineWidth": 1, "showPoints": "auto",
                                                 "spanNulls": True, "axisPlacement": "auto"}}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    return {
        "id": pid, "type": "timeseries", "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True}
                    for i, (expr, legend) in enumerate(p.targets)],
    }


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x = pid + 1, y + 1, 0
        for p in row:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(_panel_json(p, pid, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    run_query = f"label_values({M.prometheus_name(M.STEP)}, run)"
    return {
        "uid": "turnrl-training",
        "title": "turnrl: multi-turn RL training",
        "description": "MT-GRPO training runs of turnrl: rewards, credit assignment, policy update, pipeline, "
                       "actors. Panels are described in README.md, section Monitoring.",
        "tags": ["turnrl", "ray", "rl"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus (turnrl)", "value": "turnrl-prometheus"}, "hide": 0,
             "refresh": 1, "options": [], "regex": ""},
            {"name": "run", "label": "run", "type": "query", "datasource": DATASOURCE,
             "query": {"query": run_query, "refId": "run"}, "definition": run_query,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": ["All"], "value": ["$__all"]}, "refresh": 2, "sort": 1, "hide": 0,
             "options": [], "regex": ""},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed dashboard differs")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/make_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
