"""``TensorLearner``: the DeepSpeed learner of a tensor agent (a Ray actor, one rank).

One step on a table of complete groups, the same maths as the LLM learner with steps in place of tokens::

    batch   <- assemble_tensor(table)                               (learner/tensor_batch.py)
    V       <- critic(obs) at each turn's first step                 (mt_ppo, ppo only)
    A_turn  <- ESTIMATORS[algorithm.advantage](turn rewards, outcomes, turn mask, groups[, V])   float[B, K]
    A_step  <- A_turn of the turn each step belongs to                float[B, T]
    for epoch in ppo_epochs:
        loss <- ppo_clip_loss(log pi(a | s), log pi_old(a | s), A_step, step mask) - entropy_coef * H
        DeepSpeed backward + step;  critic: value_loss on R = A + V (its own engine, critic_lr)

The policy is any ``common.tensor_policy`` module; the weights go back to the rollout worker as numpy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import torch

from common import metrics as M
from common import schema as S
from common.tensor_policy import ValueMLP, build_policy, entropy, log_prob, state_to_numpy
from common.replay_queue import STALENESS_WEIGHT
from common.spaces import ActionSpace
from learner.credit_critic import VALUE_TARGETS, value_loss
from learner.critic import explained_variance
from learner.estimator_config import estimator_hparams
from learner.losses import ppo_clip_loss
from learner.tensor_batch import assemble_tensor, turn_to_steps, values_at_turn_starts
from learner.worker import _skip_cpu_shm_op, compute_turn_advantages, deepspeed_config


class TensorLearner:
    """Plain class; the trainer wraps it with ``ray.remote``."""

    def __init__(self, policy: dict[str, Any], observation_shape: tuple[int, ...], action_space: ActionSpace, *,
                 learner: dict[str, Any], algorithm: dict[str, Any], batch_episodes: int, seed: int = 0,
                 master_port: int = 29500):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(learner.get("torch_threads", 1))))
        torch.manual_seed(seed)
        import deepspeed

        self.space, self.acfg, self.lcfg = action_space, dict(algorithm), dict(learner)
        model = build_policy(policy["kind"], tuple(observation_shape), action_space, hidden=policy["hidden"],
                             layers=policy["layers"], factory=policy.get("factory"))
        ds = {"grad_clip": learner["grad_clip"], "lr": learner["lr"], "betas": list(learner["betas"]),
              "weight_decay": learner["weight_decay"], "zero_stage": 0}
        if not torch.cuda.is_available():
            _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               config=deepspeed_config(ds, batch_episodes, 1, 1))
        self.critic = None  # mt_ppo / ppo: V(obs), its own engine and learning rate
        if algorithm["advantage"] in VALUE_TARGETS:
            critic = ValueMLP(int(torch.tensor(observation_shape).prod()), policy["hidden"], policy["layers"])
            self.critic, *_ = deepspeed.initialize(
                model=critic, model_parameters=list(critic.parameters()),
                config=deepspeed_config({**ds, "lr": algorithm["critic_lr"]}, batch_episodes, 1, 1))
        self.version = 0

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, table: pa.Table) -> dict[str, float]:
        """Update the policy (and critic) on a table of complete groups; return the step's metrics."""
        import time

        t0 = time.time()
        a = self.acfg
        b = assemble_tensor(table)
        hp = estimator_hparams(a)
        values = None
        if self.critic is not None:
            with torch.no_grad():
                values = values_at_turn_starts(self.critic(b.obs), b.turn_start, b.turn_mask)  # [B, K]
        adv_turn = compute_turn_advantages(b, a["advantage"], hp, values)  # [B, K]
        adv = turn_to_steps(adv_turn, b.step_turn, b.step_mask)  # [B, T]
        if STALENESS_WEIGHT in table.column_names:  # queue stale_mode reweight: one weight per episode
            w = assemble_weights(table, b)
            adv = adv * w[:, None]
        mask = b.step_mask & ~b.truncated[:, None] if a["mask_truncated"] else b.step_mask
        stats: dict[str, float] = {}
        for _ in range(a["ppo_epochs"]):
            params, _ = self.engine(b.obs)  # [B, T, P]
            logp = log_prob(params, b.actions, self.space)  # [B, T]
            pg, diags = ppo_clip_loss(logp, b.old_logprobs, adv, mask, clip_low=a["clip_low"],
                                      clip_high=a["clip_high"], clip_ratio_c=a["clip_ratio_c"])
            ent = entropy(params, self.space)[mask].mean() if mask.any() else params.sum() * 0
            loss = pg - a["entropy_coef"] * ent
            self.engine.backward(loss)
            sq = [p.grad.detach().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
            self.engine.step()
            stats = {M.LOSS: float(loss.detach()), M.CLIP_FRAC: float(diags["clip_frac"]),
                     M.CLIP_FRAC_DUAL: float(diags["clip_frac_dual"]), M.KL_K3: float(diags["approx_kl_k3"]),
                     M.RATIO_MAX: float(diags["ratio_max"]), M.ENTROPY: float(ent.detach()), M.GRAD_NORM: grad_norm}
        if self.critic is not None:
            stats.update(self._critic_step(b, values, hp))
        for k in range(adv_turn.shape[1]):
            present = b.turn_mask[:, k]
            if present.any():
                stats[M.ADV_TURN_MEAN.format(k=k)] = float(adv_turn[present, k].mean())
                stats[M.ADV_TURN_STD.format(k=k)] = float(adv_turn[present, k].std(unbiased=False))
        self.version += 1
        stats[M.POLICY_VERSION] = float(self.version)
        stats[M.LR] = float(self.lcfg["lr"])
        stats[M.TIME_UPDATE] = time.time() - t0
        return stats

    def _critic_step(self, b, values: torch.Tensor, hp: dict[str, Any]) -> dict[str, float]:
        returns = VALUE_TARGETS[self.acfg["advantage"]](b.turn_rewards, b.outcome_rewards, b.turn_mask, b.group_ids,
                                                         values=values, **hp)  # [B, K]
        out = {}
        for _ in range(self.acfg["ppo_epochs"]):
            v = values_at_turn_starts(self.critic(b.obs), b.turn_start, b.turn_mask)
            loss, d = value_loss(v, values, returns, b.turn_mask.float(), clip=self.acfg["critic_value_clip"])
            self.critic.backward(loss)
            self.critic.step()
            out = {M.CRITIC_VALUE_LOSS: float(loss.detach()), M.CRITIC_CLIP_FRAC: float(d["clip_frac"])}
        present = b.turn_mask
        out.update({M.CRITIC_VALUE_MEAN: float(values[present].mean()), M.CRITIC_RETURN_MEAN:
                    float(returns[present].mean()), M.CRITIC_EXPLAINED_VARIANCE: explained_variance(values, returns,
                                                                                                    present)})
        return out

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The policy's weights as numpy arrays (for the rollout worker)."""
        return state_to_numpy(self.engine.module)

    def get_version(self) -> int:
        return self.version

    def save(self, path: str) -> str:
        """The trained policy as safetensors (``policy.safetensors``), never a pickle."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        out = os.path.join(path, "policy.safetensors")
        save_file({k: v.detach().contiguous() for k, v in self.engine.module.state_dict().items()}, out)
        return out


def assemble_weights(table: pa.Table, b) -> torch.Tensor:
    """float[B]: each episode's staleness weight (``STALENESS_WEIGHT``, one value per group), in batch order."""
    ids = table.column(S.EPISODE_ID).to_numpy()
    ws = table.column(STALENESS_WEIGHT).to_numpy()
    by_episode = dict(zip(ids.tolist(), ws.tolist()))
    return torch.tensor([by_episode[int(e)] for e in b.episode_ids], dtype=torch.float32)
