"""Tests for learner.credit_ops: group normalisation and the per-turn -> per-token broadcast.

Hand cases in float64; std is unbiased (n - 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.credit_ops import broadcast_to_tokens, group_normalize
from tests.learner.helpers import F64, close, t

S2 = math.sqrt(2.0)


def test_group_normalize_hand_case() -> None:
    # group 10: [0, 1, 2] -> mean 1, std sqrt((1+0+1)/2) = 1          -> [-1, 0, 1]
    # group  3: [5, 7]    -> mean 6, std sqrt((1+1)/1) = sqrt(2)      -> [-1/sqrt2, 1/sqrt2]
    # group 99: [4]       -> single member                            -> 0
    x = t([0.0, 5.0, 1.0, 7.0, 2.0, 4.0])
    ids = torch.tensor([10, 3, 10, 3, 10, 99])
    close(group_normalize(x, ids, eps=0.0), [-1.0, -1 / S2, 0.0, 1 / S2, 1.0, 0.0])
    # without std scaling only the mean is removed: [-1, -1, 0, 1, 1, 0]
    close(group_normalize(x, ids, scale_by_std=False), [-1.0, -1.0, 0.0, 1.0, 1.0, 0.0])
    # default eps=1e-6 is a small perturbation
    close(group_normalize(x, ids), [-1.0, -1 / S2, 0.0, 1 / S2, 1.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1e-3, 123.456])
def test_group_normalize_identical_values_exactly_zero(dtype, value) -> None:
    # 0.1 * 7 / 7 != 0.1 in floating point; without the degenerate-group rule this would give
    # (x - mean) / eps ~ 1e-11 instead of 0.
    x = torch.full((7,), value, dtype=dtype)
    out = group_normalize(x, torch.zeros(7, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))
    out = group_normalize(x, torch.zeros(7, dtype=torch.long), eps=0.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_group_normalize_size_one_and_empty() -> None:
    assert torch.equal(group_normalize(t([3.0]), torch.tensor([5])), t([0.0]))
    assert group_normalize(t([]), torch.tensor([], dtype=torch.long)).shape == (0,)


def test_broadcast_to_tokens_hand_case() -> None:
    adv = t([[0.5, -1.0, 2.0], [3.0, 0.0, 0.0]])
    # episode 0: prompt(2) | turn0 action(2) | tool obs(1) | turn1 action(1) | obs | turn2 | pad
    idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 2, -1], [-1, 0, 0, 0, -1, -1, -1, -1, -1]])
    lm = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = broadcast_to_tokens(adv, idx, lm)
    close(
        out,
        [[0, 0, 0.5, 0.5, 0, -1.0, 0, 2.0, 0], [0, 3.0, 3.0, 3.0, 0, 0, 0, 0, 0]],
    )
    # float masks work the same; masked tokens may carry any index
    idx2 = idx.clone()
    idx2[~lm] = 99
    assert torch.equal(broadcast_to_tokens(adv, idx2, lm.to(F64)), out)


def test_broadcast_to_tokens_rejects_bad_index_on_loss_token() -> None:
    adv = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="turn index"):
        broadcast_to_tokens(adv, torch.tensor([[0, 2]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="turn index"):
        broadcast_to_tokens(adv, torch.tensor([[-1, 0]]), torch.tensor([[1, 1]]))
