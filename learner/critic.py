"""The critic of ``algorithm.advantage: mt_ppo | ppo``: a separate value model with its own DeepSpeed engine.

Choice (documented in the README): a separate model rather than a value head on the policy, so the
policy's parameters, its weight push to the generators and its checkpoints stay exactly what they are
for every other estimator. The critic is the policy's decoder (initialised from
``algorithm.critic_model_path``, default the starting policy) plus a linear head to one scalar,
zero-initialised so the first values are 0 and the first advantages the Monte-Carlo returns.

Values sit at turn boundaries: ``V_{b,k}`` is read from the hidden state of the last token before turn
k's first action token (the end of the prompt or of the previous observation), i.e. the state the turn
acts in. One step: values of the whole batch without gradient (every rank, for the estimator), then
``ppo_epochs`` passes of the clipped value loss (``learner.credit_critic.value_loss``) over this rank's shard,
DeepSpeed all-reducing the critic's gradients across ranks. With ``learner.prefix_sharing`` both run
through the policy's shared-prefix forward (``learner.packed_forward``): each distinct prefix of a
micro-batch once, the head only at the value positions; equal to the padded forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.modeling import load_model
from learner.batch import EpisodeBatch
from learner.credit_critic import value_loss
from learner.packed_forward import PackedForward, PrefixTree


def turn_start_positions(token_turn: torch.Tensor, turn_mask: torch.Tensor) -> torch.Tensor:
    """long[B, K]: the position whose hidden state gives V of turn k (one before its first action token).

    ``token_turn`` long[B, T] (turn index of each action token, -1 elsewhere); 0 where the turn is absent.
    """
    b, k = turn_mask.shape
    t = token_turn.shape[1]
    pos = torch.arange(t, device=token_turn.device).expand(b, t)  # [B, T]
    out = torch.zeros(b, k, dtype=torch.long, device=token_turn.device)
    for j in range(k):
        first = torch.where(token_turn == j, pos, torch.full_like(pos, t)).min(dim=1).values  # [B]
        out[:, j] = torch.where(turn_mask[:, j], (first - 1).clamp(min=0), torch.zeros_like(first))
    return out


class ValueModel(nn.Module):
    """Causal LM's decoder + scalar head: ``forward(input_ids, attention_mask) -> float[B, T]`` values at every
    position. The LM is kept whole (its LM head is unused) so the shared-prefix forward can read it as it reads
    the policy."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1)  # [B, T]


class Critic:
    """The value model's DeepSpeed engine on one learner rank (built by ``LearnerWorker``)."""

    def __init__(self, model_path: str, ds_config: dict[str, Any], *, value_clip: float | None,
                 prefix_sharing: bool = False):
        import deepspeed

        lm = load_model(model_path)
        lm.config.use_cache = False
        module = ValueModel(lm)
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
        self.value_clip = value_clip
        # learner.prefix_sharing: each distinct prefix once, through the policy's shared-prefix forward
        self.packed = PackedForward.build(lm) if prefix_sharing else None

    def _turn_values(self, mb: EpisodeBatch) -> torch.Tensor:
        """float[b, K] V at the turn starts (0 where absent), with gradient."""
        device = self.engine.device
        pos = turn_start_positions(mb.token_turn, mb.turn_mask).to(device)  # [b, K]
        present = mb.turn_mask.to(device)
        if self.packed is None:
            values = self.engine(mb.input_ids.to(device), mb.attention_mask.to(device)).gather(1, pos)  # [b, K]
        else:
            tree = PrefixTree.of_padded(mb.input_ids, mb.attention_mask)
            nodes = tree.padded_path(mb.input_ids.shape[1]).to(device).gather(1, pos)  # [b, K] node of each V
            uniq, inverse = torch.unique(nodes, return_inverse=True)  # the head once per node
            hidden = self.packed.hidden(self.engine.module.lm, tree)  # [nodes, H]
            values = self.engine.module.head(hidden[uniq]).squeeze(-1)[inverse]  # [b, K]
        return torch.where(present, values, torch.zeros_like(values))

    @torch.no_grad()
    def values(self, batch: EpisodeBatch, micro: int) -> torch.Tensor:
        """float[B, K] V at every turn's start (0 on absent turns), in micro-batches, no gradient."""
        self.engine.eval()
        out = torch.cat([self._turn_values(batch.select(slice(lo, lo + micro))).cpu()
                         for lo in range(0, len(batch), micro)])
        self.engine.train()
        return out

    def update(self, mine: EpisodeBatch, old_values: torch.Tensor, returns: torch.Tensor, *, micro: int,
               epochs: int, grad_accum: int, norm_turns: float) -> dict[str, float]:
        """``epochs`` passes of the value loss over this rank's episodes; one optimizer step per pass.

        ``old_values`` / ``returns`` float[b, K] for ``mine``; the loss is summed over turns and divided by
        ``norm_turns`` (the batch's turns per rank), so the step does not depend on the micro-batching.
        """
        losses, clipped, turns = [], [], 0.0
        for _ in range(epochs):
            n = 0
            for lo in range(0, len(mine), micro):
                sl = slice(lo, lo + micro)
                mb = mine.select(sl)
                v = self._turn_values(mb)  # [b, K]
                dev = v.device
                loss, diag = value_loss(v, old_values[sl].to(dev), returns[sl].to(dev), mb.turn_mask.to(dev).float(),
                                        clip=self.value_clip, norm=norm_turns)
                self.engine.backward(loss, scale_wrt_gas=False)
                self.engine.step()
                losses.append(float(loss.detach()))
                clipped.append(float(diag["clip_frac"]) * float(mb.turn_mask.sum()))
                turns += float(mb.turn_mask.sum())
                n += 1
            for _ in range(n, grad_accum):  # keep DeepSpeed's accumulation boundary in step with the policy's
                self.engine.step()
        return {"value_loss": sum(losses) / epochs, "value_clip_frac": sum(clipped) / max(turns, 1.0)}

    def save(self, directory: str, rank: int) -> None:
        from learner.checkpoint import save_engine

        save_engine(self.engine, directory, rank, {})

    def load(self, directory: str, rank: int) -> None:
        from learner.checkpoint import load_engine

        try:
            load_engine(self.engine, directory, rank)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise RuntimeError(f"the critic checkpoint in {directory!r} does not fit this version's value model "
                               "(ValueModel: the whole causal LM under `lm.` plus `head`); it was written by an "
                               "earlier critic layout, so this run cannot resume from it") from err


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the existing turns (1: perfect critic, 0: no better than the mean)."""
    r, v = returns[mask], values[mask]
    var = float(r.var(unbiased=False)) if r.numel() > 1 else 0.0
    return 1.0 - float((r - v).var(unbiased=False)) / var if var > 0 else 0.0
