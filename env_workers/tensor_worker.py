"""``TensorEnvWorker``: a Ray actor stepping a batch of tensor envs (one per episode slot) in one call.

The rollout worker sends every active slot's action of one step at once and gets back arrays, so a step
costs one round trip per worker, not one per episode. An env that raises (a bug in an env, never a normal
outcome: ``env_workers.tensor_env`` says ``step`` must not) ends its episode with zero reward and is
counted in ``errors``; the worker and the other episodes carry on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from env_workers.tensor_env import TensorEnv, TensorStep, make_tensor_env

log = logging.getLogger(__name__)


class TensorEnvWorker:
    """Plain class; the trainer wraps it with ``ray.remote``."""

    def __init__(self, kind: str, env_kwargs: dict[str, Any], *, step_latency_s: float = 0.0):
        self.kind, self.env_kwargs = kind, dict(env_kwargs)
        self.step_latency_s = step_latency_s  # tests: a slow environment
        self._envs: dict[int, TensorEnv] = {}  # slot -> env of the episode it runs
        self._spare: list[TensorEnv] = []  # envs of finished episodes, reused by the next reset
        self.errors = 0
        probe = make_tensor_env(kind, **self.env_kwargs)
        self.observation_shape, self.action_space = tuple(probe.observation_shape), probe.action_space
        self._spare.append(probe)

    def spec(self) -> dict[str, Any]:
        """The env's observation shape and action space (the trainer builds the schema and policy from them)."""
        return {"observation_shape": self.observation_shape, "action_space": self.action_space}

    def reset(self, slots: list[int], seeds: list[int]) -> np.ndarray:
        """Start an episode in each slot from its reset seed; float32[len(slots), *observation_shape]."""
        out = np.zeros((len(slots), *self.observation_shape), dtype=np.float32)
        for i, (slot, seed) in enumerate(zip(slots, seeds)):
            old = self._envs.pop(slot, None)
            if old is not None:
                self._spare.append(old)
            env = self._spare.pop() if self._spare else make_tensor_env(self.kind, **self.env_kwargs)
            self._envs[slot] = env
            out[i] = env.reset(int(seed))
        return out

    def step(self, slots: list[int], actions: np.ndarray) -> dict[str, Any]:
        """Step each slot's env with its action (``actions[i]`` for ``slots[i]``).

        Returns ``observation`` float32[n, *obs_shape], ``turn_done`` / ``done`` / ``truncated`` bool[n], ``turn_kind``
        int64[n], and
        per slot lists ``reward`` (components), ``outcome`` (components or None) and ``info``.
        """
        if self.step_latency_s:
            time.sleep(self.step_latency_s)
        n = len(slots)
        obs = np.zeros((n, *self.observation_shape), dtype=np.float32)
        turn_done, done, trunc = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        rewards: list[dict[str, float]] = []
        outcomes: list[dict[str, float] | None] = []
        infos: list[dict[str, float]] = []
        kinds = np.zeros(n, dtype=np.int64)
        for i, slot in enumerate(slots):
            env = self._envs.get(slot)
            try:
                if env is None:
                    raise KeyError(f"slot {slot} has no episode (reset it first)")
                st = env.step(actions[i])
            except Exception as e:  # noqa: BLE001 - one broken episode must not end the others
                self.errors += 1
                log.warning("tensor env (%s) raised in slot %s: %r; the episode ends unscored", self.kind, slot, e)
                st = TensorStep(np.zeros(self.observation_shape, np.float32), {}, True, True, {}, info={"env_error": 1.0})
            obs[i], turn_done[i], done[i], trunc[i] = st.observation, st.turn_done or st.done, st.done, st.truncated
            kinds[i] = int(st.turn_kind)
            rewards.append({k: float(v) for k, v in st.reward.items()})
            outcomes.append(None if not st.done else {k: float(v) for k, v in (st.outcome or {}).items()})
            infos.append({k: float(v) for k, v in st.info.items()})
            if st.done and env is not None:
                self._spare.append(self._envs.pop(slot))
        return {"observation": obs, "turn_done": turn_done, "done": done, "truncated": trunc, "reward": rewards,
                "outcome": outcomes, "info": infos, "turn_kind": kinds}

    def stats(self) -> dict[str, float]:
        return {"errors": float(self.errors), "live_episodes": float(len(self._envs))}

    def ping(self) -> bool:
        return True
