"""Learner rank: a DeepSpeed engine that turns complete groups into a policy update.

One step: Arrow table of complete groups -> episodes (exact token ids) -> per-turn
advantages (``learner.credit``) -> token advantages -> PPO-clip loss over action
tokens only -> DeepSpeed backward/step. ``ppo_epochs`` passes over the batch, each
one optimizer step, gradient accumulation over micro-batches with the loss
normalised by the global token count (so 1x8 equals 8x1).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any

import pyarrow as pa
import torch

from actors.lean_forward import unsupported_reason
from actors.weights import WeightGroup, plan_buckets, put_buckets
from common import metrics as M
from common.modeling import load_model, load_tokenizer
from learner.batch import EpisodeBatch, assemble
from learner.checkpoint import load_engine, save_engine
from learner.credit import ESTIMATORS, broadcast_to_tokens
from learner.credit_critic import VALUE_TARGETS
from learner.critic import Critic, explained_variance
from learner.estimator_config import estimator_hparams
from learner.losses import behaviour_weights, entropy_from_logits, kl_penalty, policy_loss, token_logprobs
from learner.packed_forward import PackedForward, PrefixTree

log = logging.getLogger(__name__)


def compute_turn_advantages(batch: EpisodeBatch, estimator: str, hparams: dict[str, Any],
                            values: torch.Tensor | None = None) -> torch.Tensor:
    """Per-turn advantages float[B, K]; ``hparams`` must be keyword arguments the estimator takes; ``values``
    float[B, K] the critic's, for the estimators that take them (``learner.credit_critic``)."""
    fn = ESTIMATORS[estimator]
    accepted = inspect.signature(fn).parameters
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(f"estimator {estimator!r} does not take {unknown}")
    kwargs = dict(hparams)
    if "state_ids" in accepted:
        kwargs["state_ids"] = batch.state_ids
    if "node_ids" in accepted:
        kwargs["node_ids"] = batch.node_ids
    if "values" in accepted:
        if values is None:
            raise ValueError(f"estimator {estimator!r} needs the critic's values")
        kwargs["values"] = values
    return fn(batch.turn_rewards, batch.outcome_rewards, batch.turn_mask, batch.group_ids, **kwargs)


def distinct_tokens(batch: EpisodeBatch) -> int:
    """Distinct (prefix, token) positions of a batch's sequences: the nodes of their prefix tree."""

    return PrefixTree.of_padded(batch.input_ids, batch.attention_mask).num_nodes


def _skip_cpu_shm_op() -> None:
    """Let DeepSpeed's CPU backend use plain gloo collectives instead of JIT-compiling its
    shared-memory all-reduce op (35-60 s of C++ compilation on a fresh machine, once per
    machine). The op only speeds up all-reduce between ranks on one host."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
                 master_port: int = 29500, seed: int = 0, master_addr: str = "127.0.0.1",
                 loss_norm_len: int | None = None):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(learner.get("torch_threads", 1))))
        torch.manual_seed(seed)
        import deepspeed

        self.rank, self.world = rank, world_size
        # "seq-mean-token-sum-norm" (Dr. GRPO) divides by a constant: generation.max_tokens_per_episode from the
        # driver; None (a bare learner, tests) falls back to each batch's padded width
        self.loss_norm_len = loss_norm_len
        self.lcfg, self.acfg = learner, algorithm
        self.temperature = temperature
        self.pad_id = load_tokenizer(model_path).pad_token_id or 0
        model = load_model(model_path)
        model.config.use_cache = False
        per_rank = -(-batch_episodes // world_size)
        self.micro = min(learner["micro_batch_size"], per_rank)
        grad_accum = -(-per_rank // self.micro)
        if not torch.cuda.is_available() and not learner.get("cpu_shm_allreduce", False):
            _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(learner, self.micro, grad_accum, world_size))
        self.grad_accum = grad_accum
        self.version = 0
        self.steps = 0
        self._packed = None  # learner.prefix_sharing: the forward over distinct prefixes (learner/packed_forward.py)
        if learner.get("prefix_sharing", False):
            reason = unsupported_reason(model)
            if reason is not None:
                raise ValueError(f"config field `learner.prefix_sharing` = true: this policy has {reason}; the shared-"
                                 "prefix forward mirrors Qwen2/Llama decoders only (set it to false)")
            self._packed = PackedForward()
        self.ref = None  # algorithm.kl_coef > 0: the frozen reference policy (ref_model_path, else the starting one)
        if algorithm["kl_coef"] > 0:
            self.ref = load_model(algorithm.get("ref_model_path") or model_path).to(self.engine.device).eval()
            self.ref.requires_grad_(False)
        self.critic = None  # mt_ppo / ppo: the value model, its own engine (learner/critic.py)
        if algorithm["advantage"] in VALUE_TARGETS:
            self.critic = Critic(algorithm.get("critic_model_path") or model_path,
                                 deepspeed_config({**learner, "lr": algorithm["critic_lr"], "warmup_steps": 0},
                                                  self.micro, grad_accum, world_size),
                                 value_clip=algorithm["critic_value_clip"],
                                 prefix_sharing=bool(learner.get("prefix_sharing", False)))
        self.tokens_processed = 0.0  # tokens the last step's forwards ran over (perf/learner/tokens)
        self._lr_factor = 1.0  # learning-rate factor of the current step (learner.lag_lr_scale ** batch lag)

    # -- one training step -------------------------------------------------------------
    def train_step(self, table: pa.Table) -> dict[str, float]:
        """Update the policy on a table of complete groups; return metrics."""
        import time

        t0 = time.time()
        batch = assemble(table, self.pad_id)
        self.tokens_processed = 0.0
        lag = max(0, self.version - int(batch.versions[batch.turn_mask].min()))  # the batch's oldest turn
        self._lr_factor = float(self.lcfg["lag_lr_scale"]) ** lag  # staleness-aware step (learner.lag_lr_scale)
        self._stepped_lr = float(self.engine.get_lr()[0])
        hparams = estimator_hparams(self.acfg)
        values = self.critic.values(batch, self.micro) if self.critic is not None else None  # [B, K] V(s_k)
        turn_adv = compute_turn_advantages(batch, self.acfg["advantage"], hparams, values)  # [B, K]
        token_adv = broadcast_to_tokens(turn_adv, batch.token_turn, batch.action_mask)  # [B, T]
        token_adv = token_adv * batch.staleness_weights[:, None]  # [B, T] stale groups count less (queue "reweight")
        masked = batch.truncated if self.acfg["mask_truncated"] else torch.zeros_like(batch.truncated)  # [B]
        if masked.any():  # DAPO's overlong filtering: no gradient from these episodes (their rewards still
            batch.action_mask = batch.action_mask * (~masked)[:, None]  # entered their group's statistics)
        t_adv = time.time() - t0
        # this rank's share of the episodes (data parallel): a contiguous block, so a group's episodes stay on
        # one rank and share their prompt's forward (learner.prefix_sharing)
        idx = torch.tensor_split(torch.arange(len(batch)), self.world)[self.rank]
        mine = batch.select(idx)
        mine_adv = token_adv[idx]
        # global normaliser: action tokens of the whole batch (all ranks), labels are shifted by one
        norm_tokens = float(batch.action_mask[:, 1:].sum().clamp(min=1)) / self.world
        self._num_seqs = float(len(batch)) / self.world
        self._max_len = float(self.loss_norm_len or batch.input_ids.shape[1])
        diags: list[dict[str, float]] = []
        prox: list[torch.Tensor] = []  # per micro-batch: log-probs at the weights the update starts from
        for epoch in range(self.acfg["ppo_epochs"]):
            n_micro = 0
            for m, lo in enumerate(range(0, len(mine), self.micro)):
                sl = slice(lo, lo + self.micro)
                d = self._micro_step(mine.select(sl), mine_adv[sl], norm_tokens, prox, m, first_epoch=epoch == 0)
                diags.append(d)
                n_micro += 1
            for _ in range(n_micro, self.grad_accum):  # keep DeepSpeed's boundary in step with ours
                self._engine_step()
        critic_stats = self._critic_step(batch, mine, idx, values, hparams) if self.critic is not None else {}
        self.steps += 1
        self.version += 1
        out = self._global_diags(diags)  # whole-batch values, the same for any number of ranks
        stats: dict[str, float] = {
            M.LOSS: out["loss"], M.KL: out["approx_kl"], M.KL_K3: out["approx_kl_k3"], M.CLIP_FRAC: out["clip_frac"],
            M.CLIP_FRAC_DUAL: out["clip_frac_dual"], M.RATIO_MAX: out["ratio_max"],
            M.LOGPROB_GAP_MEAN: out["logprob_gap_mean"], M.LOGPROB_GAP_MAX: out["logprob_gap_max"],
            M.IS_WEIGHT_MEAN: out["is_weight_mean"], M.IS_CAPPED_FRAC: out["is_capped_frac"],
            M.KL_REF: out["kl_ref"], M.TRUNCATED_MASKED: float(masked.float().mean()),
            M.ENTROPY: out.get("entropy", 0.0), M.GRAD_NORM: self._reported_grad_norm(),
            M.LR: self._stepped_lr, M.POLICY_VERSION: self.version, M.STEP: self.steps,
            M.TIME_ADVANTAGE: t_adv, M.TIME_UPDATE: time.time() - t0 - t_adv,
            M.LEARNER_TOKENS: self.tokens_processed / self.acfg["ppo_epochs"],
            M.LEARNER_UNIQUE_TOKENS: float(distinct_tokens(mine)),
        }
        stats.update(critic_stats)
        for k in range(turn_adv.shape[1]):
            present = batch.turn_mask[:, k]
            if present.any():
                vals = turn_adv[present, k]
                stats[M.ADV_TURN_MEAN.format(k=k)] = float(vals.mean())
                stats[M.ADV_TURN_STD.format(k=k)] = float(vals.std(unbiased=False))
        return stats

    def _critic_step(self, batch: EpisodeBatch, mine: EpisodeBatch, idx: torch.Tensor, values: torch.Tensor,
                     hparams: dict[str, Any]) -> dict[str, float]:
        """Regress the critic on this step's targets R = A + V (before whitening); its metrics."""
        returns = VALUE_TARGETS[self.acfg["advantage"]](batch.turn_rewards, batch.outcome_rewards, batch.turn_mask,
                                                         batch.group_ids, values=values, **hparams)  # [B, K]
        out = self.critic.update(mine, values[idx], returns[idx], micro=self.micro, epochs=self.acfg["ppo_epochs"],
                                 grad_accum=self.grad_accum, norm_turns=float(batch.turn_mask.sum()) / self.world)
        present = batch.turn_mask
        return {M.CRITIC_VALUE_LOSS: out["value_loss"], M.CRITIC_CLIP_FRAC: out["value_clip_frac"],
                M.CRITIC_VALUE_MEAN: float(values[present].mean()) if present.any() else 0.0,
                M.CRITIC_RETURN_MEAN: float(returns[present].mean()) if present.any() else 0.0,
                M.CRITIC_EXPLAINED_VARIANCE: explained_variance(values, returns, present)}

    def _action_logits(self, mb: EpisodeBatch, module=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits only where the next token is an action token (the LM head dominates small models).

        ``module``: the policy being trained (default) or the frozen reference (``algorithm.kl_coef``).
        Returns (logits float[N, V], labels long[N], mask bool[b, T-1]) with N = mask.sum().
        """
        device = self.engine.device
        ids = mb.input_ids.to(device)  # [b, T]
        mask = mb.action_mask[:, 1:].to(device) > 0  # [b, T-1] position t predicts token t+1
        policy = module is None
        module = self.engine.module if policy else module
        if self._packed is not None:
            return self._packed_action_logits(module, mb, mask, count=policy)
        if policy:
            self.tokens_processed += float(ids.numel())
        if policy and self.lcfg.get("zero_stage", 0) == 3:
            # ZeRO-3 gathers partitioned parameters in hooks around the whole model's forward; calling
            # the decoder and the (tied) LM head separately gives wrong gradients, so take the full logits.
            out = self.engine(input_ids=ids, attention_mask=mb.attention_mask.to(device))
            return out.logits[:, :-1][mask], ids[:, 1:][mask], mask
        hidden = module.get_decoder()(input_ids=ids, attention_mask=mb.attention_mask.to(device)).last_hidden_state
        logits = module.get_output_embeddings()(hidden[:, :-1][mask])  # [N, V]
        return logits, ids[:, 1:][mask], mask

    def _packed_action_logits(self, module, mb: EpisodeBatch, mask: torch.Tensor, *, count: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_action_logits`` through the shared-prefix forward: each distinct prefix once, logits once per node."""

        tree = PrefixTree.of_padded(mb.input_ids, mb.attention_mask)
        if count:
            self.tokens_processed += float(tree.num_nodes)
        path = tree.padded_path(mb.input_ids.shape[1])  # [b, T]
        nodes = path[:, :-1].to(mask.device)[mask]  # [N] node that predicts each action token
        uniq, inverse = torch.unique(nodes, return_inverse=True)  # logits once per node
        hidden = self._packed.hidden(module, tree)  # [nodes, H]
        logits = module.get_output_embeddings()(hidden[uniq])[inverse]  # [N, V]
        return logits, mb.input_ids[:, 1:].to(mask.device)[mask], mask

    def _micro_step(self, mb: EpisodeBatch, adv: torch.Tensor, norm_tokens: float, prox: list[torch.Tensor],
                    m: int, *, first_epoch: bool) -> dict[str, float]:
        """Forward, loss and backward of micro-batch ``m``.

        The proximal log-probs (the policy the update starts from) are this micro-batch's own log-probs in
        the first epoch (no optimizer step has happened yet): recorded then, reused by later epochs. They are
        the ratio's denominator with ``learner.recompute_old_logprobs`` or ``algorithm.off_policy`` tis /
        decoupled (then with the behaviour -> proximal weights of ``losses.behaviour_weights``), else the
        generator's behaviour log-probs are.
        """
        logits, labels, mask = self._action_logits(mb)
        scaled = logits / self.temperature  # [N, V]
        lp_sel = token_logprobs(scaled[None], labels[None])[0]  # [N]
        logp = torch.zeros(mask.shape, dtype=lp_sel.dtype, device=lp_sel.device).masked_scatter(mask, lp_sel)
        ref_logp = None
        if self.ref is not None:  # KL to the frozen reference over the same action tokens, no gradient
            with torch.no_grad():
                ref_logits, _, _ = self._action_logits(mb, self.ref)
                ref_sel = token_logprobs((ref_logits / self.temperature)[None], labels[None])[0]  # [N]
            ref_logp = torch.zeros_like(logp).masked_scatter(mask, ref_sel.to(logp.dtype))  # [b, T-1]
        behaviour = mb.behaviour_logprobs[:, 1:].to(logp.device)  # [b, T-1]
        if first_epoch:
            prox.append(logp.detach())
        gap = (prox[m] - behaviour).abs()[mask]  # [N] learner vs generator on the same tokens
        mode = self.acfg["off_policy"]
        old = prox[m] if mode != "none" or self.lcfg["recompute_old_logprobs"] else behaviour  # [b, T-1]
        adv = adv[:, 1:].to(logp.device)  # [b, T-1]
        weights, off_diag = behaviour_weights(prox[m], behaviour, mask, mode, self.acfg["is_cap"])
        if mode != "none":
            adv = adv * weights
        use_ent = self.acfg["entropy_coef"] != 0
        ent_sel = entropy_from_logits((scaled if use_ent else scaled.detach())[None])[0]  # [N]
        ent = torch.zeros(mask.shape, dtype=ent_sel.dtype, device=ent_sel.device).masked_scatter(mask, ent_sel)
        fmask = mask.float()
        loss, diag = policy_loss(
            logp, old, adv, fmask, entropy=ent if use_ent else None, ref_logprobs=ref_logp,
            kl_coef=self.acfg["kl_coef"], kl_kind=self.acfg["kl_kind"],
            entropy_coef=self.acfg["entropy_coef"], clip_low=self.acfg["clip_low"],
            clip_high=self.acfg["clip_high"], clip_ratio_c=self.acfg["clip_ratio_c"],
            agg_mode=self.acfg["loss_agg"], norm_tokens=norm_tokens,
            num_seqs=self._num_seqs, max_len=self._max_len)
        self.engine.backward(loss, scale_wrt_gas=False)
        self._engine_step()
        d = {k: float(v) for k, v in diag.items() if torch.is_tensor(v) and v.numel() == 1}
        d["loss"] = float(loss.detach())
        d["entropy"] = float(ent_sel.detach().mean()) if ent_sel.numel() else 0.0
        d["tokens"] = float(mask.sum())
        d.update({k: float(v) for k, v in off_diag.items()})
        if ref_logp is not None:  # token-mean KL to the reference (the estimator of algorithm.kl_kind)

            d["kl_ref"] = float(kl_penalty(logp.detach(), ref_logp, self.acfg["kl_kind"])[mask].mean()) if mask.any() else 0.0
        d["logprob_gap_mean"] = float(gap.mean()) if gap.numel() else 0.0
        d["logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
        return d

    def _global_diags(self, diags: list[dict[str, float]]) -> dict[str, float]:
        """Diagnostics of the whole batch: identical on every rank and for any number of ranks.

        ``loss`` is the sum of the micro-batch losses (each already divided by the global
        normaliser), averaged over epochs; ``approx_kl`` (k1 and k3), ``clip_frac`` (PPO and dual)
        and ``entropy`` are token-weighted means; ``ratio_max`` the largest ratio. Sums and the
        max go through all-reduces, so every rank must call this.
        """
        keys = ("approx_kl", "approx_kl_k3", "clip_frac", "clip_frac_dual", "entropy", "is_weight_mean",
                "is_capped_frac", "logprob_gap_mean", "kl_ref")
        maxima = ("ratio_max", "logprob_gap_max")
        vec = [sum(d["tokens"] for d in diags), sum(d["loss"] for d in diags)]
        vec += [sum(d.get(k, 0.0) * d["tokens"] for d in diags) for k in keys]
        t = torch.tensor(vec, dtype=torch.float64, device=self.engine.device)  # [2 + len(keys)]
        top = torch.tensor([max((d.get(k, 0.0) for d in diags), default=0.0) for k in maxima], dtype=torch.float64,
                           device=self.engine.device)  # [len(maxima)]
        if self.world > 1:
            torch.distributed.all_reduce(t)
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
        out = {"loss": float(t[1]) / self.world / self.acfg["ppo_epochs"]}
        out.update({k: float(top[i]) for i, k in enumerate(maxima)})
        out.update({k: float(t[2 + i]) / max(float(t[0]), 1.0) for i, k in enumerate(keys)})
        return out

    def _engine_step(self) -> None:
        """DeepSpeed ``step`` (the optimizer runs at the accumulation boundary).

        At the boundary under ZeRO-0 the parameters hold the all-reduced gradients, and
        DeepSpeed keeps no global norm for a plain fp32 torch optimizer, so take it here
        (before clipping, as DeepSpeed reports it under ZeRO-1/2/3).
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.lcfg.get("zero_stage", 0) == 0 and boundary:
            sq = [p.grad.detach().float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
        if not boundary or self._lr_factor == 1.0:
            self.engine.step()
            return
        groups = self.engine.optimizer.param_groups
        base = [g["lr"] for g in groups]  # this step's learning rate (the warmup schedule's, if any)
        for g, lr in zip(groups, base):
            g["lr"] = lr * self._lr_factor
        self._stepped_lr = groups[0]["lr"]
        self.engine.step()
        if self.scheduler is None:  # a schedule sets the next step's rate itself; else put the base rate back
            for g, lr in zip(groups, base):
                g["lr"] = lr

    def _reported_grad_norm(self) -> float:
        """DeepSpeed's global gradient norm of the last optimizer step, else the one taken in ``_engine_step``."""
        norm = self.engine.get_global_grad_norm()
        if norm is None or float(norm) == 0.0:
            norm = getattr(self, "_grad_norm", 0.0)
        return float(norm)

    # -- weights --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _full_state(self):
        """The policy's full state dict on its device, no copy (rank 0; other ranks get ``{}``).

        Under ZeRO-3 the parameters are partitioned: every rank must enter this (a collective
        gather) and the tensors are valid only inside it.
        """
        module = self.engine.module
        if self.lcfg.get("zero_stage", 0) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module.state_dict() if self.rank == 0 else {}
        else:
            yield module.state_dict() if self.rank == 0 else {}

    def _joins_export(self) -> bool:
        """Whether this rank takes part in a weight export (rank 0; every rank under ZeRO-3's gather)."""
        return self.rank == 0 or self.lcfg.get("zero_stage", 0) == 3

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU copy of the policy's state dict (rank 0; a collective under ZeRO-3, see ``_full_state``)."""
        with self._full_state() as state:
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def export_weights(self, bucket_bytes: int) -> list:
        """Object-store path: the policy in buckets (``actors.weights.put_buckets``); rank 0 returns the refs.

        ``ray.put`` copies each tensor once into shared memory straight from the parameters.
        """

        if not self._joins_export():
            return []
        with self._full_state() as state:
            return put_buckets(state, bucket_bytes) if state else []

    def weight_plan(self, bucket_bytes: int) -> list:
        """The bucket table of the policy (names, dtypes, shapes; no data) the broadcast receivers need."""

        if not self._joins_export():
            return []
        with self._full_state() as state:
            return plan_buckets(state, bucket_bytes) if state else []

    def weight_endpoint(self) -> tuple[str, int]:
        """(this node's IP, a free port) for the weight group's rendezvous (rank 0 hosts its store)."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float = 600.0
                          ) -> int:
        """Rank 0: host the weight-broadcast group (rank 0 = this learner, 1..n = generators); blocks until joined."""

        if self.rank != 0:
            raise RuntimeError("only learner rank 0 joins the weight group")
        if getattr(self, "_weight_group", None) is not None:
            self._weight_group.close()
        self._weight_group = WeightGroup(host, port, 0, world_size, backend=backend, timeout_s=timeout_s)
        return 0

    def broadcast_weights(self, bucket_bytes: int) -> int:
        """Broadcast path: rank 0 sends the policy bucket by bucket to the group; returns the version.

        The generators must be in ``Generator.receive_weights`` with the plan of ``weight_plan``.
        Under ZeRO-3 every rank must call this (the gather); only rank 0 sends.
        """
        if not self._joins_export():
            return self.version
        with self._full_state() as state:
            if state:
                if getattr(self, "_weight_group", None) is None:
                    raise RuntimeError("init_weight_group first")
                self._weight_group.send(state, bucket_bytes)
        return self.version

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

    # -- checkpoints (learner/checkpoint.py) ----------------------------------------------------
    def save_checkpoint(self, directory: str, client_state: dict[str, Any]) -> str:
        """DeepSpeed checkpoint of this rank into ``directory`` (every rank must call it) plus its RNG."""

        save_engine(self.engine, directory, self.rank, {**client_state, "learner_steps": self.steps})
        if self.critic is not None:
            self.critic.save(os.path.join(directory, "critic"), self.rank)
        return directory

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore weights, optimizer, LR schedule, RNG and version (every rank); returns the client state."""

        client = load_engine(self.engine, directory, self.rank)
        if self.critic is not None:
            self.critic.load(os.path.join(directory, "critic"), self.rank)
        self.version = int(client.get("version", self.version))
        self.steps = int(client.get("learner_steps", self.steps))
        return client

    def get_version(self) -> int:
        return self.version
