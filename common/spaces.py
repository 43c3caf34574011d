"""The types of the tensor-env interface (``env_workers.tensor_env``): action spaces and a step's result, shared by
the envs, the policies, the Arrow schema and the learner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ActionSpace:
    """``discrete``: an int in ``[0, n)`` (stored as int64[1]); else a float32[dim] box in ``[low, high]``."""

    discrete: bool
    n: int = 0  # number of discrete actions
    dim: int = 0  # box dimension
    low: float = -1.0
    high: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return (1,) if self.discrete else (self.dim,)

    @property
    def dtype(self) -> str:
        return "int64" if self.discrete else "float32"


@dataclass
class TensorStep:
    observation: np.ndarray  # float32[*observation_shape] after the action (the next action's input)
    reward: dict[str, float]  # components of this step's contribution to the turn reward
    turn_done: bool  # this step ends the current turn
    done: bool  # the episode ended (a terminal state or the step limit)
    outcome: dict[str, float] | None = None  # outcome components, exactly when done
    truncated: bool = False  # ended by a step limit, not by the task
    info: dict[str, Any] = field(default_factory=dict)  # per-episode figures for metrics (floats), on done
    turn_kind: int = 0  # the sub-goal this step's turn pursues (the arm: 0 grasp, 1 aim, 2 throw): turns of one kind
    #                    share a step-level baseline in gigpo (the rows' state_hash)
