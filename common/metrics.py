"""Metric names (one place), their help strings and Prometheus names and types (written out by
``common.telemetry``).

Logs use ``area/quantity/stat`` names; Prometheus gets ``turnrl_<area>_<quantity>[_stat]``.
Every metric the system emits is declared in ``METRICS`` with a help string, so the
README, the Grafana dashboards and the code agree.
"""

from __future__ import annotations

import re


# --- rollout -----------------------------------------------------------------
REWARD_TOTAL = "rollout/reward/total/mean"
REWARD_TURN = "rollout/reward/turn/mean"
REWARD_OUTCOME = "rollout/reward/outcome/mean"
TOOL_SUCCESS = "rollout/tool_success/rate"
TOOL_CALLED = "rollout/tool_called/rate"
ANSWER_IN_RESULT = "rollout/answer_in_result/rate"
EXACT_MATCH = "rollout/exact_match/rate"
FORMAT_SCORE = "rollout/format/mean"
TRUNCATED = "rollout/truncated/rate"
TURNS_MEAN = "rollout/turns/mean"
ACTION_TOKENS_MEAN = "rollout/action_tokens/mean"
EPISODES_TOTAL = "rollout/episodes/total"
ROLLOUT_IN_FLIGHT = "rollout/in_flight/groups"  # async mode
ROLLOUT_FAILED_CALLS = "rollout/failed_calls/total"  # async mode
ROLLOUT_ABORTED_EPISODES = "rollout/aborted_episodes/count"  # rollout.partial_rollouts: abort
ROLLOUT_MIXED_VERSION_EPISODES = "rollout/mixed_version_episodes/count"
ROLLOUT_KV_REUSE = "rollout/kv_reuse/fraction"  # history tokens served from the generators' KV caches / all history tokens
ROLLOUT_FORKED_EPISODES = "rollout/forked_episodes/count"  # rollout.tree: leaves forked from a live parent
REWARD_JUDGE_TURN = "rollout/reward/judge_turn/mean"  # judge.enabled: judge component of the turn rewards, per episode
REWARD_JUDGE_OUTCOME = "rollout/reward/judge_outcome/mean"  # judge.enabled: judge component of the outcome reward
ROLLOUT_GENERATED_TOKENS = "rollout/generated_tokens/total"  # action tokens sampled this step (a tree's shared turns once)
# --- advantages ----------------------------------------------------------------
ADV_TURN_MEAN = "train/advantage/turn{k}/mean"  # format with k = turn index
ADV_TURN_STD = "train/advantage/turn{k}/std"
# --- learner ------------------------------------------------------------------
LOSS = "train/loss"
KL = "train/kl"
CLIP_FRAC = "train/clip_frac"
CLIP_FRAC_DUAL = "train/clip_frac_dual"  # tokens capped by the dual clip (algorithm.clip_ratio_c)
KL_REF = "train/kl_ref"  # KL to the frozen reference policy (algorithm.kl_coef > 0; 0 otherwise)
TRUNCATED_MASKED = "train/truncated_masked_frac"  # episodes left out of the gradient (algorithm.mask_truncated)
KL_K3 = "train/kl_k3"  # (rho - 1) - log rho, CleanRL's non-negative approx_kl
RATIO_MAX = "train/ratio_max"  # largest PPO ratio of the step (after the log-ratio clamp)
LOGPROB_GAP_MEAN = "train/logprob_gap/mean"  # |learner - generator| log-prob on the same tokens, before the update
LOGPROB_GAP_MAX = "train/logprob_gap/max"
IS_WEIGHT_MEAN = "train/is_weight/mean"  # algorithm.off_policy: behaviour -> proximal importance weight
IS_CAPPED_FRAC = "train/is_weight/capped_frac"
ENTROPY = "train/entropy"
GRAD_NORM = "train/grad_norm"
LR = "train/lr"
POLICY_VERSION = "train/policy_version"
STEP = "train/step"
# --- queue ------------------------------------------------------------------------
QUEUE_ROWS = "queue/depth/rows"
QUEUE_BYTES = "queue/depth/bytes"
QUEUE_GROUPS = "queue/depth/groups"
QUEUE_PUT_ROWS = "queue/put/rows_total"
QUEUE_GET_ROWS = "queue/get/rows_total"
QUEUE_DROPPED_STALE = "queue/dropped_stale/groups_total"
POLICY_LAG_MEAN = "queue/policy_lag/mean"
POLICY_LAG_MAX = "queue/policy_lag/max"
QUEUE_GROUPS_IN_FLIGHT = "queue/depth/groups_in_flight"
QUEUE_SPILLED_BYTES = "queue/depth/spilled_bytes"
QUEUE_PUT_RATE = "queue/put/rows_per_s"
QUEUE_GET_RATE = "queue/get/rows_per_s"
QUEUE_GET_GROUPS = "queue/get/groups_total"
QUEUE_DROPPED_STALE_ROWS = "queue/dropped_stale/rows_total"
QUEUE_REWEIGHTED_STALE = "queue/reweighted_stale/groups_total"
QUEUE_DROPPED_DUPLICATE = "queue/dropped_duplicate/rows_total"
QUEUE_DROPPED_LATE = "queue/dropped_late/rows_total"
QUEUE_ABORTED_GROUPS = "queue/aborted/groups_total"
QUEUE_ABORTED_ROWS = "queue/aborted/rows_total"
QUEUE_SPILLED_TOTAL = "queue/spill/bytes_total"
POLICY_LAG_RELEASED_MAX = "queue/policy_lag/released_max"
QUEUE_PRODUCER_WAIT = "queue/producer_wait/seconds_total"
QUEUE_PRODUCER_BLOCKED = "queue/producer_wait/puts_total"
QUEUE_LEARNER_WAIT = "queue/learner_wait/seconds_total"
QUEUE_LEARNER_IDLE = "queue/learner_wait/idle_frac"
# --- performance -------------------------------------------------------------------
TOKENS_PER_S = "perf/tokens_per_s"
TIME_ROLLOUT = "perf/time/rollout_s"
TIME_ADVANTAGE = "perf/time/advantage_s"
TIME_UPDATE = "perf/time/update_s"
TIME_SYNC = "perf/time/weight_push_s"
TIME_STEP = "perf/time/step_s"
TIME_BATCH_WAIT = "perf/time/batch_wait_s"
LEARNER_TOKENS = "perf/learner/tokens"  # token positions the learner's forwards ran over (padding included)
LEARNER_UNIQUE_TOKENS = "perf/learner/unique_tokens"  # distinct (prefix, token) nodes of the batch: the least any forward needs
TIME_JUDGE = "perf/time/judge_s"  # seconds the env workers waited on the judge this step (summed over env workers)
# --- judge: the generative reward model (judge.enabled; env_workers/judge_client.py) ------------------
JUDGE_REQUESTS = "judge/requests/total"
JUDGE_FAILURES = "judge/failures/total"
JUDGE_CACHE_HITS = "judge/cache_hits/total"
JUDGE_RETRIES = "judge/retries/total"
JUDGE_CACHE_HIT_RATE = "judge/cache_hit/rate"
JUDGE_TURN_SCORE = "judge/score/turn/mean"
JUDGE_OUTCOME_SCORE = "judge/score/outcome/mean"
JUDGE_THROUGHPUT = "judge/throughput/prompts_per_s"
# --- actors (fault tolerance) ---------------------------------------------------------
ACTOR_RESTARTS = "actors/restarts/total"
ACTOR_RESTARTS_ROLE = "actors/restarts/{role}"  # format with role in ACTOR_ROLES
ACTOR_ROLES = ("generator", "env_worker", "learner", "rollout", "queue", "judge")
# --- audit: every episode counted exactly once (learner/faults.py) ---------------------------
AUDIT_STARTED = "audit/episodes/started_total"
AUDIT_COMPLETED = "audit/episodes/completed_total"
AUDIT_TRAINED = "audit/episodes/trained_total"
AUDIT_ABANDONED = "audit/episodes/abandoned_total"
AUDIT_STALE = "audit/episodes/stale_dropped_total"
AUDIT_DUPLICATES = "audit/episodes/duplicates_total"
AUDIT_UNACCOUNTED = "audit/episodes/unaccounted"
AUDIT_ENV_REPLAYED = "audit/episodes/env_replayed_total"
AUDIT_ROLLOUT_RETRIES = "audit/rollout/retries_total"
CHECKPOINT_STEP = "checkpoint/step"
CHECKPOINT_TIME = "perf/time/checkpoint_s"

# --- held-out evaluation during training (eval.every_steps) ------------------------------------------
EVAL_EXACT_MATCH = "eval/exact_match/rate"
EVAL_TOOL_SUCCESS = "eval/tool_success/rate"
EVAL_ANSWER_IN_RESULT = "eval/answer_in_result/rate"
EVAL_FORMAT = "eval/format/mean"
EVAL_TURNS = "eval/turns/mean"
EVAL_TRUNCATED = "eval/truncated/rate"
EVAL_MULTI_HOP_ANSWER_IN_RESULT = "eval/multi_hop/answer_in_result/rate"
EVAL_MULTI_HOP_SEARCHES = "eval/multi_hop/searches/mean"

# --- the critic of mt_ppo / ppo (learner/critic.py) -----------------------------------------------------
CRITIC_VALUE_LOSS = "critic/value_loss"
CRITIC_CLIP_FRAC = "critic/value_clip_frac"
CRITIC_VALUE_MEAN = "critic/value/mean"
CRITIC_RETURN_MEAN = "critic/return/mean"
CRITIC_EXPLAINED_VARIANCE = "critic/explained_variance"

METRICS: dict[str, str] = {
    REWARD_TOTAL: "Mean total reward (turn + outcome) per episode",
    REWARD_TURN: "Mean summed turn reward per episode",
    REWARD_OUTCOME: "Mean outcome reward per episode",
    TOOL_SUCCESS: "Fraction of tool calls that executed successfully",
    TOOL_CALLED: "Fraction of episodes that called the tool at least once",
    ANSWER_IN_RESULT: "Fraction of episodes whose search result contained an answer alias",
    EXACT_MATCH: "Fraction of episodes whose answer exactly matched an alias",
    FORMAT_SCORE: "Mean format reward component",
    TRUNCATED: "Fraction of episodes cut at max turns or max tokens",
    TURNS_MEAN: "Mean assistant turns per episode",
    ACTION_TOKENS_MEAN: "Mean action tokens per episode",
    EPISODES_TOTAL: "Episodes consumed by the learner so far",
    ROLLOUT_IN_FLIGHT: "Groups handed to the rollout worker and not yet finished (async mode)",
    ROLLOUT_FAILED_CALLS: "Rollout-worker calls lost to a crash; their groups were aborted and sampled again (async mode)",
    ROLLOUT_ABORTED_EPISODES: "Episode attempts of the step thrown away because a weight push landed mid-episode (partial_rollouts: abort)",
    ROLLOUT_MIXED_VERSION_EPISODES: "Episodes of the step whose turns came from more than one policy version",
    ROLLOUT_KV_REUSE: "Share of the turns' history tokens whose KV a generator reused instead of prefilling",
    ROLLOUT_FORKED_EPISODES: "Tree leaves forked from a live parent episode at a branch turn (rollout.tree)",
    ROLLOUT_GENERATED_TOKENS: "Action tokens sampled by the generators this step (a tree's shared turns count once)",
    LOSS: "Policy loss of the last step",
    KL: "Approximate KL between behaviour and current policy",
    CLIP_FRAC: "Fraction of action tokens whose ratio was clipped",
    CLIP_FRAC_DUAL: "Fraction of action tokens with negative advantage whose loss the dual clip capped",
    KL_REF: "Token-mean KL of the policy to the frozen reference (algorithm.kl_kind estimator; 0 without kl_coef)",
    TRUNCATED_MASKED: "Fraction of the batch's episodes that were truncated and carry no gradient (algorithm.mask_truncated)",
    KL_K3: "Approximate KL between behaviour and current policy, k3 form (ratio - 1) - log ratio",
    RATIO_MAX: "Largest PPO ratio (current over old policy) over the step's action tokens",
    LOGPROB_GAP_MEAN: "Mean |learner - generator| log-prob of the sampled tokens before the update (numerics, plus the policy change of stale rows)",
    LOGPROB_GAP_MAX: "Max |learner - generator| log-prob of the sampled tokens before the update",
    IS_WEIGHT_MEAN: "Mean behaviour-to-proximal importance weight of the action tokens (algorithm.off_policy; 1 with none)",
    IS_CAPPED_FRAC: "Share of action tokens whose importance weight was truncated (tis) or dropped (decoupled)",
    ENTROPY: "Mean token entropy of the policy",
    GRAD_NORM: "Global gradient norm before clipping",
    LR: "Learning rate",
    POLICY_VERSION: "Version of the learner's weights",
    STEP: "Learner step",
    QUEUE_ROWS: "Turns held in the replay queue",
    QUEUE_BYTES: "Bytes of Arrow data held in the replay queue",
    QUEUE_GROUPS: "Complete groups waiting in the replay queue",
    QUEUE_PUT_ROWS: "Turns put into the replay queue",
    QUEUE_GET_ROWS: "Turns handed to the learner",
    QUEUE_DROPPED_STALE: "Groups dropped for exceeding the policy-lag bound",
    POLICY_LAG_MEAN: "Mean policy lag (versions) of turns handed to the learner",
    POLICY_LAG_MAX: "Max policy lag (versions) of turns handed to the learner",
    QUEUE_GROUPS_IN_FLIGHT: "Incomplete groups held in the replay queue (episodes still running)",
    QUEUE_SPILLED_BYTES: "Bytes of the replay queue spilled to Arrow IPC files on local disk",
    QUEUE_PUT_RATE: "Turns put into the replay queue per second (last 30 s)",
    QUEUE_GET_RATE: "Turns handed to the learner per second (last 30 s)",
    QUEUE_GET_GROUPS: "Complete groups handed to the learner",
    QUEUE_DROPPED_STALE_ROWS: "Turns dropped for exceeding the policy-lag bound",
    QUEUE_REWEIGHTED_STALE: "Groups beyond the policy-lag bound released with a staleness weight < 1",
    QUEUE_DROPPED_DUPLICATE: "Turns dropped because the same (episode, turn) was already held",
    QUEUE_DROPPED_LATE: "Turns dropped because their group was already released, dropped or aborted",
    QUEUE_ABORTED_GROUPS: "Groups aborted (partial rollouts discarded)",
    QUEUE_ABORTED_ROWS: "Turns discarded with aborted groups",
    QUEUE_SPILLED_TOTAL: "Bytes written to spill files so far",
    POLICY_LAG_RELEASED_MAX: "Largest group policy lag ever handed to the learner (<= max_policy_lag in drop mode)",
    QUEUE_PRODUCER_WAIT: "Seconds producers spent blocked on a full replay queue",
    QUEUE_PRODUCER_BLOCKED: "Puts that had to wait for room in the replay queue",
    QUEUE_LEARNER_WAIT: "Seconds the learner spent blocked in get waiting for complete groups",
    QUEUE_LEARNER_IDLE: "Fraction of wall time since the first get spent blocked in get",
    TOKENS_PER_S: "Action tokens generated per second during rollout",
    TIME_ROLLOUT: "Seconds spent generating the step's episodes",
    TIME_ADVANTAGE: "Seconds spent computing advantages",
    TIME_UPDATE: "Seconds spent in the DeepSpeed update",
    TIME_SYNC: "Seconds spent pushing weights to the generators",
    TIME_STEP: "Seconds per training step",
    TIME_BATCH_WAIT: "Seconds the learner waited this step for a batch of complete groups",
    LEARNER_TOKENS: "Token positions the learner's forward passes ran over in the step, padding included (per epoch)",
    LEARNER_UNIQUE_TOKENS: "Distinct (prefix, token) positions of the step's batch: the work a forward cannot avoid",
}
METRICS[ACTOR_RESTARTS] = "Ray restarts of this run's actors so far (all roles)"
METRICS.update({
    REWARD_JUDGE_TURN: "Mean judge component (judge.turn_weight x score) of the turn rewards per trained episode",
    REWARD_JUDGE_OUTCOME: "Mean judge component (judge.outcome_weight x score) of the outcome reward per trained episode",
    TIME_JUDGE: "Seconds the env workers spent waiting on the judge in the step (summed over env workers)",
    JUDGE_REQUESTS: "Judge items (search turns, final answers) asked for so far, cache hits included",
    JUDGE_FAILURES: "Judge items that scored 0 because their call failed, timed out or hit a dead judge actor",
    JUDGE_RETRIES: "Judge batches sent again because their judge actor had died or was restarting",
    JUDGE_CACHE_HITS: "Judge items answered without a judge call: from an env worker's cache of (kind, prompt) scores, or by the same prompt in the same request",
    JUDGE_CACHE_HIT_RATE: "Share of the step's judge items answered without a judge call (cache or a repeated prompt)",
    JUDGE_TURN_SCORE: "Mean judge score in [0, 1] of the step's judged search turns",
    JUDGE_OUTCOME_SCORE: "Mean judge score in [0, 1] of the step's judged final answers",
    JUDGE_THROUGHPUT: "Prompts the judge model scored per second of its own compute in the step",
})
METRICS.update({
    AUDIT_STARTED: "Episode ids handed to the rollout worker (retries under new ids included)",
    AUDIT_COMPLETED: "Episodes the rollout worker reported finished",
    AUDIT_TRAINED: "Distinct episodes in the learner's batches",
    AUDIT_ABANDONED: "Episodes given up after a fault (their prompts were sampled again under new ids)",
    AUDIT_STALE: "Episodes the replay queue dropped for exceeding the policy-lag bound",
    AUDIT_DUPLICATES: "Episodes trained (or completed) more than once; must stay 0",
    AUDIT_UNACCOUNTED: "Started episodes neither trained, abandoned, stale nor in flight; must be 0 between steps",
    AUDIT_ENV_REPLAYED: "Episodes whose env state was rebuilt on a restarted env worker (same episode, same rows)",
    AUDIT_ROLLOUT_RETRIES: "Rollout calls re-run after the rollout worker died",
    CHECKPOINT_STEP: "Step of the newest resumable checkpoint (0: none yet)",
    CHECKPOINT_TIME: "Seconds spent writing the last checkpoint",
    EVAL_EXACT_MATCH: "Held-out exact match, sampled at the training temperature (eval.every_steps)",
    EVAL_TOOL_SUCCESS: "Held-out share of episodes whose tool calls all executed (eval.every_steps)",
    EVAL_ANSWER_IN_RESULT: "Held-out share of episodes whose search result held an answer alias (eval.every_steps)",
    EVAL_FORMAT: "Held-out mean format reward component (eval.every_steps)",
    EVAL_TURNS: "Held-out mean assistant turns per episode (eval.every_steps)",
    EVAL_TRUNCATED: "Held-out share of truncated episodes (eval.every_steps)",
    EVAL_MULTI_HOP_ANSWER_IN_RESULT: "Held-out questions of 2+ hops: share whose search found the answer's article",
    EVAL_MULTI_HOP_SEARCHES: "Held-out questions of 2+ hops: mean tool calls per episode",
})
METRICS.update({
    CRITIC_VALUE_LOSS: "Critic's clipped value loss of the step (mt_ppo, ppo)",
    CRITIC_CLIP_FRAC: "Share of turns whose value loss took the clipped branch (algorithm.critic_value_clip)",
    CRITIC_VALUE_MEAN: "Mean critic value V at the batch's turn starts, before the step's update",
    CRITIC_RETURN_MEAN: "Mean GAE return target R = A + V of the batch's turns",
    CRITIC_EXPLAINED_VARIANCE: "1 - Var(R - V) / Var(R) over the batch's turns (1: perfect critic)",
})
# --- tensor agents (kind: tensor; learner/tensor_driver.py) -----------------------------
AGENT_SUCCESS = "rollout/success/rate"  # share of the step's episodes the env calls a success (arm: a basket)
AGENT_STEPS = "rollout/env_steps/mean"  # env steps per episode
AGENT_SUBGOAL = "rollout/subgoal/{name}/rate"  # arm: share of episodes that grasped / aimed at the hoop
AGENT_ENV_ERRORS = "rollout/env_errors/total"  # env steps that raised (the episode ended unscored)
EVAL_SUCCESS = "eval/success/rate"  # held-out success rate, sampled (eval.every_steps)
EVAL_RETURN = "eval/return/mean"  # held-out mean of turn rewards + outcome per episode
SUBGOALS = ("grasped", "aimed")  # the arm's sub-goal flags (env_workers/arm.py info)
METRICS.update({
    AGENT_SUCCESS: "Share of the step's trained episodes the tensor env reports as a success (the arm: a basket)",
    AGENT_STEPS: "Mean env steps per trained episode of a tensor agent",
    AGENT_ENV_ERRORS: "Tensor env steps that raised so far (each ended its episode unscored)",
    EVAL_SUCCESS: "Held-out success rate of the tensor agent, sampled (eval.every_steps)",
    EVAL_RETURN: "Held-out mean return (turn rewards + outcome) of the tensor agent (eval.every_steps)",
    **{AGENT_SUBGOAL.format(name=n): f"Share of the step's trained arm episodes with the sub-goal {n}" for n in SUBGOALS},
})
for _role in ACTOR_ROLES:
    METRICS[ACTOR_RESTARTS_ROLE.format(role=_role)] = f"Ray restarts of this run's {_role} actors so far"
for _k in range(8):
    METRICS[ADV_TURN_MEAN.format(k=_k)] = f"Mean advantage of turn {_k} tokens' turns"
    METRICS[ADV_TURN_STD.format(k=_k)] = f"Std of the advantage of turn {_k}"


def prometheus_kind(name: str) -> str:
    """How a metric is exposed: ``counter`` (a running total, logged as ``..._total``), ``histogram`` (a
    duration in seconds, ``perf/time/*_s``, observed once a step so its distribution is kept) or ``gauge``."""
    if name.startswith("perf/time/") and name.endswith("_s"):
        return "histogram"
    if name.endswith("total"):
        return "counter"
    return "gauge"


def prometheus_name(name: str) -> str:
    """``rollout/tool_success/rate`` -> ``turnrl_rollout_tool_success_rate``; durations end in ``_seconds``
    (``perf/time/step_s`` -> ``turnrl_perf_time_step_seconds``, a histogram), counters in ``_total``."""
    out = "turnrl_" + re.sub(r"[^a-zA-Z0-9_]", "_", name).strip("_")
    if prometheus_kind(name) == "histogram":
        out = out[: -len("_s")] + "_seconds"
    return out
