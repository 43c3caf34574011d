"""The agent-agnostic turn interface: environments whose observations and actions are tensors.

The LLM environment's unit is a turn of text; here a turn is one or more env steps that pursue one
sub-goal (a macro-action), and it carries its own turn reward. The same estimators
(``learner.credit.ESTIMATORS``) then see per-turn rewards and an outcome, whatever the policy is::

    env = make_tensor_env(kind, **settings)
    obs = env.reset(seed)                      # float32[*env.observation_shape]; same seed, same episode
    while True:
        step = env.step(action)                # TensorStep
        ...                                    # step.turn_done: this step closes the current turn
        if step.done: break                    # step.outcome: the episode's outcome components

Rules every env keeps (the env worker relies on them):

- ``reset(seed)`` is deterministic in ``seed``; ``step`` is deterministic given the actions.
- ``done`` implies ``turn_done``; ``outcome`` is a dict exactly when ``done``.
- ``reward`` holds the components of this step's turn reward; a turn's reward is the sum over its steps.
- ``turn_kind`` names the sub-goal of the step's turn (the same on every step of a turn); ``gigpo`` gives turns of
  one kind in a group a shared step-level baseline. Envs whose turns are all alike leave it 0.
- ``step`` never raises on an action of the right shape: an out-of-range action is clipped (box) or
  treated as the env documents (discrete), never a crash.

Two kinds are registered: ``arm`` (:mod:`env_workers.arm`, the seed's pick-aim-throw task) and ``gym``
(:class:`GymTurnEnv`, any Gymnasium env with a box observation, turns = fixed windows of steps).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from common.spaces import ActionSpace, TensorStep  # noqa: F401 - part of this interface


class TensorEnv(Protocol):
    observation_shape: tuple[int, ...]
    action_space: ActionSpace

    def reset(self, seed: int) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> TensorStep: ...


class GymTurnEnv:
    """A Gymnasium env as a turn env: each turn is ``turn_steps`` env steps (the last one may be shorter).

    Turn reward: ``{"env": turn_reward_scale * sum of the env's rewards over the turn's steps}``. Outcome, when
    the episode ends: ``{"return": outcome_scale * the episode's env return}`` plus ``{"success": 1}`` when
    it lasted to ``max_steps`` without terminating (for CartPole: the pole stayed up), else 0. The episode is
    truncated when it hits ``max_steps`` (Gymnasium's ``truncated`` too).
    """

    def __init__(self, env_id: str = "CartPole-v1", *, turn_steps: int = 25, max_steps: int = 200,
                 turn_reward_scale: float = 0.04, outcome_scale: float = 0.005, success_weight: float = 1.0):
        import gymnasium as gym

        if turn_steps < 1 or max_steps < turn_steps:
            raise ValueError(f"turn_steps={turn_steps}, max_steps={max_steps}: need 1 <= turn_steps <= max_steps")
        self.env = gym.make(env_id, max_episode_steps=max_steps)
        obs_space, act_space = self.env.observation_space, self.env.action_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(f"{env_id}: observation space {obs_space} is not a Box")
        self.observation_shape = tuple(int(d) for d in obs_space.shape)
        if isinstance(act_space, gym.spaces.Discrete):
            self.action_space = ActionSpace(discrete=True, n=int(act_space.n))
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            self.action_space = ActionSpace(discrete=False, dim=int(act_space.shape[0]),
                                            low=float(np.min(act_space.low)), high=float(np.max(act_space.high)))
        else:
            raise ValueError(f"{env_id}: action space {act_space} is neither Discrete nor a 1-D Box")
        self.turn_steps, self.max_steps = turn_steps, max_steps
        self.turn_reward_scale, self.outcome_scale, self.success_weight = turn_reward_scale, outcome_scale, success_weight
        self._t = self._in_turn = 0
        self._return = 0.0

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=int(seed))
        self._t = self._in_turn = 0
        self._return = 0.0
        return np.asarray(obs, dtype=np.float32)

    def step(self, action: np.ndarray) -> TensorStep:
        a = np.asarray(action)
        if self.action_space.discrete:
            act: Any = int(np.clip(int(a.reshape(-1)[0]), 0, self.action_space.n - 1))
        else:
            act = np.clip(a.astype(np.float32).reshape(-1), self.action_space.low, self.action_space.high)
        obs, r, terminated, truncated, _ = self.env.step(act)
        self._t += 1
        self._in_turn += 1
        self._return += float(r)
        done = bool(terminated or truncated or self._t >= self.max_steps)
        turn_done = done or self._in_turn >= self.turn_steps
        kind = (self._t - 1) // self.turn_steps  # turn k of every episode is the k-th window: its own kind
        if turn_done:
            self._in_turn = 0
        outcome = info = None
        if done:
            survived = not terminated
            outcome = {"return": self.outcome_scale * self._return,
                       "success": self.success_weight * float(survived)}
            info = {"success": float(survived), "episode_steps": float(self._t), "env_return": self._return}
        return TensorStep(np.asarray(obs, dtype=np.float32), {"env": self.turn_reward_scale * float(r)}, turn_done,
                          done, outcome, truncated=bool(done and not terminated), info=info or {}, turn_kind=kind)


def _make_arm(**kwargs: Any) -> TensorEnv:
    from env_workers.arm import ArmThrowEnv

    return ArmThrowEnv(**kwargs)


TENSOR_ENVS: dict[str, Callable[..., TensorEnv]] = {"arm": _make_arm, "gym": GymTurnEnv}


def make_tensor_env(kind: str, **kwargs: Any) -> TensorEnv:
    """A new env of ``kind`` (a key of :data:`TENSOR_ENVS`) with its settings."""
    if kind not in TENSOR_ENVS:
        raise ValueError(f"tensor env kind {kind!r}: must be one of {sorted(TENSOR_ENVS)}")
    return TENSOR_ENVS[kind](**kwargs)
