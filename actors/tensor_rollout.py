"""``TensorRolloutWorker``: the generator of a tensor agent. It holds a copy of the policy, steps the
episodes of a call in lock-step through the env workers, and streams one Arrow row per finished turn
into the replay queue (``common.schema.tensor_transition_schema``).

    obs <- env workers reset(seeds)                        (one call per worker)
    while some episode runs:
        params <- policy(obs of the running episodes)      (one batched forward, T = 1; GRU state carried)
        a ~ pi(params); logp <- log pi(a)
        results <- env workers step(a)                     (one call per worker)
        a turn that ended -> a row (its steps' observations, actions, log-probs, rewards) -> the queue

The learner pushes weights with :meth:`load_weights` (numpy arrays, versioned).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from common import schema as S
from common.tensor_policy import build_policy, load_numpy_state, log_prob, sample
from common.spaces import ActionSpace

log = logging.getLogger(__name__)


class _Episode:
    """What one running episode has gathered: its finished turns' rows and the current turn's steps."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.turn = 0
        self.steps = 0
        self.obs: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.logps: list[float] = []
        self.step_rewards: list[float] = []
        self.components: dict[str, float] = {}
        self.t_start = time.time()
        self.turn_rewards: list[float] = []
        self.turn_components: dict[str, float] = {}

    def add(self, obs: np.ndarray, action: np.ndarray, logp: float, reward: dict[str, float]) -> None:
        self.obs.append(obs)
        self.actions.append(action)
        self.logps.append(logp)
        self.step_rewards.append(float(sum(reward.values())))
        for k, v in reward.items():
            self.components[k] = self.components.get(k, 0.0) + v
        self.steps += 1

    def close_turn(self, *, run_id: str, version: int, last: bool, outcome: dict[str, float] | None,
                   truncated: bool, kind: int) -> dict[str, Any]:
        s = self.spec
        turn_reward = float(sum(self.components.values()))
        row = {S.RUN_ID: run_id, S.GROUP_ID: s["group_id"], S.EPISODE_ID: s["episode_id"],
               S.PROMPT_ID: s["prompt_id"], S.TURN_INDEX: self.turn, S.POLICY_VERSION: version, S.STATE_HASH: kind,
               S.OBSERVATIONS: np.stack(self.obs), S.ACTIONS: np.stack(self.actions),
               S.STEP_LOGPROBS: self.logps, S.STEP_REWARDS: self.step_rewards,
               S.TURN_REWARD: turn_reward, S.TURN_REWARD_COMPONENTS: dict(self.components),
               S.IS_LAST_TURN: last, S.OUTCOME_REWARD: float(sum((outcome or {}).values())) if last else 0.0,
               S.OUTCOME_REWARD_COMPONENTS: dict(outcome or {}) if last else {}, S.TRUNCATED: truncated and last,
               S.GROUP_SIZE: s["group_size"], S.T_START: self.t_start, S.T_END: time.time()}
        self.turn_rewards.append(turn_reward)
        for k, v in self.components.items():
            self.turn_components[k] = self.turn_components.get(k, 0.0) + v
        self.turn += 1
        self.obs, self.actions, self.logps, self.step_rewards, self.components = [], [], [], [], {}
        self.t_start = time.time()
        return row


class TensorRolloutWorker:
    """Plain class; the trainer wraps it with ``ray.remote``."""

    def __init__(self, policy: dict[str, Any], observation_shape: tuple[int, ...], action_space: ActionSpace,
                 env_workers: list, queue: Any, *, run_id: str, torch_threads: int = 1):
        torch.set_num_threads(max(1, torch_threads))
        self.space = action_space
        self.obs_shape = tuple(observation_shape)
        self.policy = build_policy(policy["kind"], self.obs_shape, action_space, hidden=policy["hidden"],
                                   layers=policy["layers"], factory=policy.get("factory")).eval()
        self.schema = S.tensor_transition_schema(self.obs_shape, action_space.shape, action_space.dtype)
        self.env_workers, self.queue, self.run_id = env_workers, queue, run_id
        self.version = 0

    def load_weights(self, version: int, state: dict[str, Any]) -> int:
        load_numpy_state(self.policy, state)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def run(self, episodes: list[dict[str, Any]], *, greedy: bool = False, seed: int = 0,
            to_queue: bool = True) -> dict[str, Any]:
        """Run ``episodes`` (dicts with ``group_id``, ``episode_id``, ``prompt_id`` = the reset seed,
        ``group_size``) to the end; with ``to_queue``, stream their rows into the queue.

        Returns ``episodes``: one summary per episode (turns, steps, rewards, the env's per-episode info) and
        ``seconds`` / ``env_s`` / ``policy_s`` timings."""
        import ray

        t0 = time.time()
        n, W = len(episodes), len(self.env_workers)
        eps = [_Episode(e) for e in episodes]
        owner = np.arange(n) % W  # episode i runs in slot i of worker i % W
        obs = np.zeros((n, *self.obs_shape), dtype=np.float32)
        resets = [self.env_workers[w].reset.remote([int(i) for i in np.flatnonzero(owner == w)],
                                                   [int(episodes[i]["prompt_id"]) for i in np.flatnonzero(owner == w)])
                  for w in range(W)]
        for w, part in enumerate(ray.get(resets)):
            obs[owner == w] = part
        state = self.policy.initial_state(n)
        gen = torch.Generator().manual_seed(int(seed))
        active = np.ones(n, dtype=bool)
        summaries: list[dict[str, Any] | None] = [None] * n
        env_s = policy_s = 0.0
        puts = []
        while active.any():
            idx = np.flatnonzero(active)
            tp = time.time()
            rows_t = torch.as_tensor(idx)
            with torch.no_grad():
                sub = None if state is None else state[:, rows_t]
                params, new_state = self.policy(torch.from_numpy(obs[idx])[:, None], sub)  # [n, 1, P]
                acts = sample(params[:, 0], self.space, gen, greedy)  # [n, *action_shape]
                logps = log_prob(params[:, 0], acts, self.space).numpy()  # [n]
            if state is not None:
                state[:, rows_t] = new_state
            acts_np = acts.numpy().astype(np.int64 if self.space.discrete else np.float32)
            policy_s += time.time() - tp
            te = time.time()
            calls = {}
            for w in range(W):
                mine = np.flatnonzero(owner[idx] == w)
                if len(mine):
                    calls[w] = (mine, self.env_workers[w].step.remote([int(i) for i in idx[mine]], acts_np[mine]))
            results = {w: (mine, ray.get(ref)) for w, (mine, ref) in calls.items()}
            env_s += time.time() - te
            rows = []
            for w, (mine, res) in results.items():
                for j, pos in enumerate(mine):
                    i = int(idx[pos])
                    ep = eps[i]
                    ep.add(obs[i].copy(), acts_np[pos], float(logps[pos]), res["reward"][j])
                    obs[i] = res["observation"][j]
                    done = bool(res["done"][j])
                    if res["turn_done"][j] or done:
                        rows.append(ep.close_turn(run_id=self.run_id, version=self.version, last=done,
                                                  outcome=res["outcome"][j], truncated=bool(res["truncated"][j]),
                                                  kind=int(res["turn_kind"][j])))
                    if done:
                        active[i] = False
                        summaries[i] = self._summary(ep, res["outcome"][j] or {}, bool(res["truncated"][j]),
                                                     res["info"][j])
            if rows and to_queue:
                puts.append(self.queue.put.remote(S.tensor_rows_to_batch(rows, self.schema)))
                if len(puts) > 4:  # bounded in flight: the queue's backpressure reaches this loop
                    ray.get(puts.pop(0))
        ray.get(puts)
        return {"episodes": summaries, "seconds": time.time() - t0, "env_s": env_s, "policy_s": policy_s}

    def _summary(self, ep: _Episode, outcome: dict[str, float], truncated: bool, info: dict[str, float]
                 ) -> dict[str, Any]:
        s = ep.spec
        return {"episode_id": s["episode_id"], "group_id": s["group_id"], "prompt_id": s["prompt_id"],
                "turns": ep.turn, "steps": ep.steps, "turn_reward": float(sum(ep.turn_rewards)),
                "outcome_reward": float(sum(outcome.values())), "turn_components": dict(ep.turn_components),
                "outcome_components": dict(outcome), "truncated": truncated, "info": dict(info)}

    def ping(self) -> bool:
        return True
