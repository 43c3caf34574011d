"""Exact-arithmetic helpers shared by the learner's math tests (credit, credit_ops, losses)."""

from __future__ import annotations

import torch

F64 = torch.float64


def t(x, dtype=F64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def close(a: torch.Tensor, b, atol: float = 1e-12) -> None:
    """``a`` equals ``b`` (a tensor or nested list) within ``atol``, no relative tolerance."""
    b = b if isinstance(b, torch.Tensor) else t(b)
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=0)
