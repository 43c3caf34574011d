"""Learner rank: a DeepSpeed engine that turns complete groups into a policy update.

One step: Arrow table of complete groups -> episodes (exact token ids) -> per-turn
advantages (``learner.credit``) -> token advantages -> PPO-clip loss over action
tokens only -> DeepSpeed backward/step. ``ppo_epochs`` passes over the batch, each
one optimizer step, gradient accumulation over micro-batches with the loss
normalised by the global token count (so 1x8 equals 8x1).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import pyarrow as pa
import torch

from common import metrics as M
from learner.batch import EpisodeBatch, assemble
from learner.credit import ESTIMATORS, broadcast_to_tokens
from learner.losses import entropy_from_logits, policy_loss, token_logprobs

log = logging.getLogger(__name__)


def compute_turn_advantages(batch: EpisodeBatch, estimator: str, hparams: dict[str, Any]) -> torch.Tensor:
    """Per-turn advantages float[B, K] with the estimator's own keyword arguments only."""
    fn = ESTIMATORS[estimator]
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    if "state_ids" in accepted:
        kwargs["state_ids"] = batch.state_ids
    return fn(batch.turn_rewards, batch.outcome_rewards, batch.turn_mask, batch.group_ids, **kwargs)


def deepspeed_config(lcfg: dict[str, Any], micro_batch: int, grad_accum: int, world: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": lcfg["grad_clip"],
        "optimizer": {"type": "AdamW", "params": {
            "lr": lcfg["lr"], "betas": list(lcfg["betas"]), "weight_decay": lcfg["weight_decay"],
            "eps": 1e-8, "torch_adam": True}},
        "zero_optimization": {"stage": lcfg["zero_stage"]},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if lcfg.get("warmup_steps", 0) > 0:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lcfg["lr"], "warmup_num_steps": lcfg["warmup_steps"],
            "warmup_type": "linear"}}
    if torch.cuda.is_available() and lcfg.get("dtype") == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    return cfg


class LearnerWorker:
    """Plain class; the driver wraps it with ``ray.remote``. One instance per data-parallel rank."""

    def __init__(self, model_path: str, *, learner: dict[str, Any], algorithm: dict[str, Any],
                 temperature: float, batch_episodes: int, rank: int = 0, world_size: int = 1,
                 master_port: int = 29500, seed: int = 0, master_addr: str = "127.0.0.1"):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(learner.get("torch_threads", 1))))
        torch.manual_seed(seed)
        import deepspeed

        from common.modeling import load_model, load_tokenizer

        self.rank, self.world = rank, world_size
        self.lcfg, self.acfg = learner, algorithm
        self.temperature = temperature
        self.pad_id = load_tokenizer(model_path).pad_token_id or 0
        model = load_model(model_path)
        model.config.use_cache = False
        per_rank = -(-batch_episodes // world_size)
        self.micro = min(learner["micro_batch_size"], per_rank)
        grad_accum = -(-per_rank // self.micro)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(learner, self.micro, grad_accum, world_size))
        self.grad_accum = grad_accum
        self.version = 0
        self.steps = 0

    # -- one training step -------------------------------------------------------------
    def train_step(self, table: pa.Table) -> dict[str, float]:
        """Update the policy on a table of complete groups; return metrics."""
        import time

        t0 = time.time()
        batch = assemble(table, self.pad_id)
        hp = {"turn_coef": self.acfg["turn_coef"], "outcome_coef": self.acfg["outcome_coef"],
              "gamma": self.acfg["gamma"], "eps": self.acfg["eps"]}
        turn_adv = compute_turn_advantages(batch, self.acfg["advantage"], hp)  # [B, K]
        token_adv = broadcast_to_tokens(turn_adv, batch.token_turn, batch.action_mask)  # [B, T]
        t_adv = time.time() - t0
        # this rank's share of the episodes (data parallel)
        idx = torch.arange(len(batch))[self.rank::self.world]
        mine = batch.select(idx)
        mine_adv = token_adv[idx]
        # global normaliser: action tokens of the whole batch (all ranks), labels are shifted by one
        norm_tokens = float(batch.action_mask[:, 1:].sum().clamp(min=1)) / self.world
        self._num_seqs = float(len(batch)) / self.world
        self._max_len = float(batch.input_ids.shape[1])
        diags: list[dict[str, float]] = []
        for _epoch in range(self.acfg["ppo_epochs"]):
            n_micro = 0
            for lo in range(0, len(mine), self.micro):
                sl = slice(lo, lo + self.micro)
                d = self._micro_step(mine.select(sl), mine_adv[sl], norm_tokens)
                diags.append(d)
                n_micro += 1
            for _ in range(n_micro, self.grad_accum):  # keep DeepSpeed's boundary in step with ours
                self.engine.step()
        self.steps += 1
        self.version += 1
        out = self._global_diags(diags)  # whole-batch values, the same for any number of ranks
        stats: dict[str, float] = {
            M.LOSS: out.get("loss", 0.0), M.KL: out.get("approx_kl", 0.0), M.CLIP_FRAC: out.get("clip_frac", 0.0),
            M.ENTROPY: out.get("entropy", 0.0), M.GRAD_NORM: float(self.engine.get_global_grad_norm() or 0.0),
            M.LR: float(self.engine.get_lr()[0]), M.POLICY_VERSION: self.version, M.STEP: self.steps,
            M.TIME_ADVANTAGE: t_adv, M.TIME_UPDATE: time.time() - t0 - t_adv,
        }
        for k in range(turn_adv.shape[1]):
            present = batch.turn_mask[:, k]
            if present.any():
                vals = turn_adv[present, k]
                stats[M.ADV_TURN_MEAN.format(k=k)] = float(vals.mean())
                stats[M.ADV_TURN_STD.format(k=k)] = float(vals.std(unbiased=False))
        return stats

    def _action_logits(self, mb: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits only where the next token is an action token (the LM head dominates small models).

        Returns (logits float[N, V], labels long[N], mask bool[b, T-1]) with N = mask.sum().
        """
        device = self.engine.device
        ids = mb.input_ids.to(device)  # [b, T]
        mask = mb.action_mask[:, 1:].to(device) > 0  # [b, T-1] position t predicts token t+1
        module = self.engine.module
        if self.lcfg.get("zero_stage", 0) == 3:
            # ZeRO-3 gathers partitioned parameters in hooks around the whole model's forward; calling
            # the decoder and the (tied) LM head separately gives wrong gradients, so take the full logits.
            out = self.engine(input_ids=ids, attention_mask=mb.attention_mask.to(device))
            return out.logits[:, :-1][mask], ids[:, 1:][mask], mask
        hidden = module.get_decoder()(input_ids=ids, attention_mask=mb.attention_mask.to(device)).last_hidden_state
        logits = module.get_output_embeddings()(hidden[:, :-1][mask])  # [N, V]
        return logits, ids[:, 1:][mask], mask

    def _micro_step(self, mb: EpisodeBatch, adv: torch.Tensor, norm_tokens: float) -> dict[str, float]:
        logits, labels, mask = self._action_logits(mb)
        scaled = logits / self.temperature  # [N, V]
        lp_sel = token_logprobs(scaled[None], labels[None])[0]  # [N]
        logp = torch.zeros(mask.shape, dtype=lp_sel.dtype, device=lp_sel.device).masked_scatter(mask, lp_sel)
        old = mb.behaviour_logprobs[:, 1:].to(logp.device)  # [b, T-1]
        use_ent = self.acfg["entropy_coef"] != 0
        ent_sel = entropy_from_logits((scaled if use_ent else scaled.detach())[None])[0]  # [N]
        ent = torch.zeros(mask.shape, dtype=ent_sel.dtype, device=ent_sel.device).masked_scatter(mask, ent_sel)
        fmask = mask.float()
        loss, diag = policy_loss(
            logp, old, adv[:, 1:].to(logp.device), fmask, entropy=ent if use_ent else None,
            entropy_coef=self.acfg["entropy_coef"], clip_low=self.acfg["clip_low"],
            clip_high=self.acfg["clip_high"], agg_mode=self.acfg["loss_agg"], norm_tokens=norm_tokens,
            num_seqs=self._num_seqs, max_len=self._max_len)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        d = {k: float(v) for k, v in diag.items() if torch.is_tensor(v) and v.numel() == 1}
        d["loss"] = float(loss.detach())
        d["entropy"] = float(ent_sel.detach().mean()) if ent_sel.numel() else 0.0
        d["tokens"] = float(mask.sum())
        return d

    def _global_diags(self, diags: list[dict[str, float]]) -> dict[str, float]:
        """Diagnostics of the whole batch: identical on every rank and for any number of ranks.

        ``loss`` is the sum of the micro-batch losses (each already divided by the global
        normaliser), averaged over epochs; ``approx_kl``, ``clip_frac`` and ``entropy`` are
        token-weighted means. Sums go through an all-reduce, so every rank must call this.
        """
        keys = ("approx_kl", "clip_frac", "entropy")
        vec = [sum(d["tokens"] for d in diags), sum(d["loss"] for d in diags)]
        vec += [sum(d.get(k, 0.0) * d["tokens"] for d in diags) for k in keys]
        t = torch.tensor(vec, dtype=torch.float64, device=self.engine.device)  # [2 + len(keys)]
        if self.world > 1:
            torch.distributed.all_reduce(t)
        out = {"loss": float(t[1]) / self.world / self.acfg["ppo_epochs"]}
        out.update({k: float(t[2 + i]) / max(float(t[0]), 1.0) for i, k in enumerate(keys)})
        return out

    # -- weights --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU state dict of the policy (rank 0 pushes it to the generators).

        Under ZeRO-3 the parameters are partitioned: every rank must call this (a collective
        gather); ranks other than 0 get an empty dict.
        """
        module = self.engine.module
        if self.lcfg.get("zero_stage", 0) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank != 0:
                    return {}
                return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def export_weights(self, bucket_bytes: int) -> list:
        """Put the policy into the object store in buckets; return the object refs (CPU path)."""
        import ray

        from actors.generator import bucketize

        if self.rank != 0 and self.lcfg.get("zero_stage", 0) != 3:
            return []  # rank 0 holds the full weights; only ZeRO-3 needs every rank (gather)
        state = self.state_dict()
        return [ray.put(b) for b in bucketize(state, bucket_bytes)] if self.rank == 0 else []

    def save_pretrained(self, out_dir: str) -> str:
        """Write the policy with ``save_pretrained`` (rank 0 writes; under ZeRO-3 call it on every rank)."""
        if self.lcfg.get("zero_stage", 0) == 3:
            state = self.state_dict()  # collective gather
            if self.rank == 0:
                self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            return out_dir
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def get_version(self) -> int:
        return self.version
