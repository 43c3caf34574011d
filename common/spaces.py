"""Action spaces of tensor agents (shared by the envs, the policies, the Arrow schema and the learner)."""

from __future__ import annotations

from dataclasses import dataclass


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
