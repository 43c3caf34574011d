"""A 2-rank DeepSpeed learner (gloo on CPU, one Ray actor per rank) equals a 1-rank learner.

Same tiny policy, same hand-built Arrow table of complete groups, same global batch. Each
rank trains on its contiguous shard of the episodes with the loss normalised by the global token
count, so after DeepSpeed's gradient all-reduce (an average over ranks) the gradients, the
update and the diagnostics must equal those of one rank that sees the whole batch.

Adam's first steps are nearly sign(gradient), blind to a wrong gradient scale, so under ZeRO
stage 0 the test also captures the all-reduced gradients right before each optimizer step;
under ZeRO-1/2/3 the gradient norm DeepSpeed reports plays that role.
"""

from __future__ import annotations

import math
import random
import socket

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from common import metrics as M
from common import schema as S
from common.config import load_config
from learner.worker import LearnerWorker

GROUPS, G = 2, 4  # 8 episodes of 2 turns; micro-batches of 2 -> 4 micro-steps (1 rank), 2 per rank (2 ranks)
DIAGS = (M.LOSS, M.KL, M.CLIP_FRAC, M.ENTROPY)


class GradProbe(LearnerWorker):
    """LearnerWorker that records the (all-reduced, clipped) gradients at every optimizer step (ZeRO-0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads: list[dict[str, torch.Tensor]] = []
        if self.lcfg["zero_stage"] == 0:
            opt, step = self.engine.optimizer, self.engine.optimizer.step

            def probed(*a, **kw):
                self.grads.append({n: p.grad.detach().clone() for n, p in self.engine.module.named_parameters()
                                   if p.grad is not None})
                return step(*a, **kw)

            opt.step = probed

    def captured(self) -> list[dict[str, torch.Tensor]]:
        return self.grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(vocab: int, shared: bool = False) -> pa.Table:
    """GROUPS x G two-turn episodes with random tokens; behaviour log-probs near the tiny model's.

    ``shared``: as GRPO batches are, the episodes of a group share their prompt, and two of them
    also their first action and its observation (a prefix tree with branches at several depths).
    """
    rng = random.Random(0)
    rows = []
    for g in range(GROUPS):
        prompt, first = None, None
        for e in range(G):
            base = {S.RUN_ID: "r", S.GROUP_ID: g, S.EPISODE_ID: g * G + e, S.PROMPT_ID: g, S.POLICY_VERSION: 0,
                    S.STATE_HASH: 0, S.TURN_REWARD_COMPONENTS: {}, S.OUTCOME_REWARD_COMPONENTS: {},
                    S.TRUNCATED: False, S.TOOL_CALLED: True, S.TOOL_SUCCESS: True, S.RESULT_CONTAINS_ANSWER: False,
                    S.GROUP_SIZE: G, S.T_START: 0.0, S.T_END: 0.0}

            def toks(n):
                return [rng.randrange(10, vocab) for _ in range(n)]

            def logprobs(n):  # a random-init model is close to uniform: ratios near 1, some clipped
                return [-math.log(vocab) + rng.uniform(-0.3, 0.3) for _ in range(n)]

            a0, a1 = toks(rng.randint(2, 6)), toks(rng.randint(1, 4))
            context, obs = toks(5), toks(3)
            if shared:
                prompt = prompt or context
                first = first or (a0, obs)
                context, (a0, obs) = prompt, (first if e < 2 else (a0, obs))
            rows.append({**base, S.TURN_INDEX: 0, S.CONTEXT_TOKEN_IDS: context, S.ACTION_TOKEN_IDS: a0,
                         S.ACTION_LOGPROBS: logprobs(len(a0)), S.OBSERVATION_TOKEN_IDS: obs,
                         S.TURN_REWARD: rng.random(), S.IS_LAST_TURN: False, S.OUTCOME_REWARD: 0.0})
            rows.append({**base, S.TURN_INDEX: 1, S.CONTEXT_TOKEN_IDS: [], S.ACTION_TOKEN_IDS: a1,
                         S.ACTION_LOGPROBS: logprobs(len(a1)), S.OBSERVATION_TOKEN_IDS: [],
                         S.TURN_REWARD: 0.0, S.IS_LAST_TURN: True, S.OUTCOME_REWARD: rng.random()})
    return pa.Table.from_batches([S.transitions_to_batch(rows)])


def _train(ray, model_dir, table, *, world: int, zero_stage: int, prefix_sharing: bool | None = None,
           extra: tuple[str, ...] = (), steps: int = 1) -> dict:
    """``steps`` train_steps on ``world`` ranks (as the driver does it); returns the last step's stats, the
    weights, the gradients. ``extra``: more config overrides.

    ``prefix_sharing`` None: the config default where it applies (off under ZeRO-3)."""
    sharing = zero_stage != 3 if prefix_sharing is None else prefix_sharing
    cfg = load_config(None, [f"learner.zero_stage={zero_stage}", f"learner.num_ranks={world}",
                             f"learner.prefix_sharing={str(sharing).lower()}",
                             "learner.micro_batch_size=2", "learner.lr=0.01", "learner.grad_clip=1000000.0",
                             "learner.torch_threads=1", "algorithm.ppo_epochs=2", f"algorithm.group_size={G}",
                             f"algorithm.prompts_per_step={GROUPS}", *extra])
    lc, a = cfg.learner, cfg.algorithm
    port = _free_port()
    ranks = [ray.remote(GradProbe).options(num_cpus=1).remote(
        str(model_dir), learner={**vars(lc), "betas": list(lc.betas), "dtype": "float32"}, algorithm=vars(a),
        temperature=1.0, batch_episodes=GROUPS * G, rank=r, world_size=world, master_port=port, seed=0)
        for r in range(world)]
    try:
        ref = ray.put(table)
        for _ in range(steps):
            per_rank = ray.get([w.train_step.remote(ref) for w in ranks])
        stats = {k: sum(s[k] for s in per_rank) / world for k in per_rank[0]}
        buckets = ray.get([w.export_weights.remote(64 * 2**20) for w in ranks])[0]  # collective under ZeRO-3
        weights = {k: v.clone() for b in ray.get(buckets) for k, v in b.tensors().items()}  # PackedBuckets
        grads = ray.get(ranks[0].captured.remote())
        saved = None
        if zero_stage == 3:
            out = model_dir.parent / f"saved-z3-w{world}"
            ray.get([w.save_pretrained.remote(str(out)) for w in ranks])
            saved = load_file(str(out / "model.safetensors"))
        return {"stats": stats, "per_rank": per_rank, "weights": weights, "grads": grads, "saved": saved}
    finally:
        for w in ranks:
            ray.kill(w)


@pytest.fixture(scope="module")
def setup(tiny_policy, ray_local):
    from common.modeling import load_tokenizer

    table = _table(len(load_tokenizer(tiny_policy)))
    reference = _train(ray_local, tiny_policy, table, world=1, zero_stage=0)
    return ray_local, tiny_policy, table, reference


def _assert_same_update(got: dict, ref: dict, base: dict[str, torch.Tensor]) -> None:
    assert set(got["weights"]) == set(ref["weights"])
    moved = max((ref["weights"][k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3, "the reference update did not move the weights; the comparison would be vacuous"
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    for key in DIAGS:
        assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-4, abs=1e-6), key
    assert got["stats"][M.POLICY_VERSION] == ref["stats"][M.POLICY_VERSION]


def test_two_ranks_equal_one_rank_zero0(setup):
    ray, model_dir, table, ref = setup
    got = _train(ray, model_dir, table, world=2, zero_stage=0)
    base = load_file(str(model_dir / "model.safetensors"))
    _assert_same_update(got, ref, base)
    # every rank reports the whole batch's diagnostics (all-reduced), not its shard's
    for key in DIAGS:
        assert got["per_rank"][0][key] == pytest.approx(got["per_rank"][1][key], rel=1e-12), key
    # the all-reduced gradients equal the one-rank gradients at both optimizer steps (ppo_epochs=2)
    assert len(got["grads"]) == len(ref["grads"]) == 2
    for g2, g1 in zip(got["grads"], ref["grads"]):
        assert set(g2) == set(g1)
        assert math.sqrt(sum(float(g.pow(2).sum()) for g in g1.values())) > 1e-4
        for name, g in g1.items():  # relative to the tensor's norm: a wrong scale or shard gives ~1
            rel = float((g2[name] - g).norm() / g.norm().clamp(min=1e-12))
            assert rel < 1e-3, f"{name}: gradient differs by {rel:.2e} of its norm"
    # ZeRO-0 with a plain fp32 optimizer: DeepSpeed keeps no norm; the learner takes it from the gradients
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref["grads"][-1].values()))
    assert ref["stats"][M.GRAD_NORM] == pytest.approx(ref_norm, rel=1e-5)
    assert got["stats"][M.GRAD_NORM] == pytest.approx(ref_norm, rel=1e-4)


def test_mt_ppo_two_ranks_equal_one_rank(setup):
    """The critic trains data-parallel too: each rank regresses on its shard, DeepSpeed all-reduces the
    critic's gradients, so the second step's values (after one critic update) and the policy equal one rank's."""
    ray, model_dir, table, _ = setup
    extra = ("algorithm.advantage=mt_ppo", "algorithm.critic_lr=0.01")
    one = _train(ray, model_dir, table, world=1, zero_stage=0, extra=extra, steps=2)
    two = _train(ray, model_dir, table, world=2, zero_stage=0, extra=extra, steps=2)
    assert one["stats"][M.CRITIC_VALUE_MEAN] != 0.0  # the critic moved after the first step
    for key in (M.CRITIC_VALUE_MEAN, M.CRITIC_RETURN_MEAN, M.CRITIC_EXPLAINED_VARIANCE):
        assert two["per_rank"][0][key] == pytest.approx(two["per_rank"][1][key], rel=1e-9), key
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6), key
    _assert_same_update(two, one, load_file(str(model_dir / "model.safetensors")))


def test_two_ranks_zero3_equal_one_rank(setup):
    """ZeRO-3 (the paper recipe's stage): partitioned parameters, gathered for the weight push and the save."""
    ray, model_dir, table, ref = setup
    got = _train(ray, model_dir, table, world=2, zero_stage=3)
    base = load_file(str(model_dir / "model.safetensors"))
    _assert_same_update(got, ref, base)
    last = ref["grads"][-1]
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in last.values()))
    assert got["stats"][M.GRAD_NORM] == pytest.approx(ref_norm, rel=1e-4)
    for k, w in got["saved"].items():  # save_pretrained wrote the gathered (full) weights
        torch.testing.assert_close(w, ref["weights"][k], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_zero12_equal_one_rank(setup, zero_stage):
    ray, model_dir, table, ref = setup
    got = _train(ray, model_dir, table, world=2, zero_stage=zero_stage)
    _assert_same_update(got, ref, load_file(str(model_dir / "model.safetensors")))
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref["grads"][-1].values()))
    assert got["stats"][M.GRAD_NORM] == pytest.approx(ref_norm, rel=1e-4)


def test_staleness_weight_scales_the_groups_gradient(setup):
    """Queue "reweight" mode: a staleness weight w on every row scales the policy gradient by w (no KL/entropy)."""
    ray, model_dir, table, ref = setup
    w = 0.25
    weighted = table.append_column(pa.field(S.STALENESS_WEIGHT, pa.float32()), pa.array([w] * table.num_rows,
                                                                                        pa.float32()))
    got = _train(ray, model_dir, weighted, world=1, zero_stage=0)
    for name, g in ref["grads"][0].items():  # first optimizer step: both at the initial weights
        torch.testing.assert_close(got["grads"][0][name], w * g, rtol=1e-4, atol=1e-8)


def test_prefix_sharing_equals_the_padded_forward(setup):
    """learner.prefix_sharing: the forward over distinct prefixes takes the same step as one padded row per
    episode, on a batch whose groups share prompts and, in part, first turns (learner/packed_forward.py)."""

    ray, model_dir, _, _ = setup
    from common.modeling import load_tokenizer

    table = _table(len(load_tokenizer(model_dir)), shared=True)
    packed = _train(ray, model_dir, table, world=1, zero_stage=0, prefix_sharing=True)
    padded = _train(ray, model_dir, table, world=1, zero_stage=0, prefix_sharing=False)
    _assert_same_update(packed, padded, load_file(str(model_dir / "model.safetensors")))
    for g_p, g_r in zip(packed["grads"], padded["grads"]):  # both optimizer steps (ppo_epochs=2)
        for name, g in g_r.items():
            torch.testing.assert_close(g_p[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # the work counts: the packed forward ran over each micro-batch's distinct prefixes (micro-batches of 2
    # episodes share less than the whole batch does), the padded one over every padded row
    unique = packed["stats"][M.LEARNER_UNIQUE_TOKENS]
    assert unique == padded["stats"][M.LEARNER_UNIQUE_TOKENS]
    assert unique <= packed["stats"][M.LEARNER_TOKENS] < padded["stats"][M.LEARNER_TOKENS]
    rows = [sum(len(r[c]) for r in table.to_pylist() if r[S.EPISODE_ID] == e
                for c in (S.CONTEXT_TOKEN_IDS, S.ACTION_TOKEN_IDS, S.OBSERVATION_TOKEN_IDS))
            for e in range(GROUPS * G)]
    assert unique < sum(rows)  # the prompts (and two first turns per group) were computed once


def test_the_critic_through_the_shared_prefix_forward_equals_the_padded_one(setup):
    """mt_ppo with learner.prefix_sharing: the critic's values and regression run over distinct prefixes, and
    two steps (the second reading the first's critic update) equal the padded forward's."""
    ray, model_dir, _, _ = setup
    from common.modeling import load_tokenizer

    table = _table(len(load_tokenizer(model_dir)), shared=True)
    extra = ("algorithm.advantage=mt_ppo", "algorithm.critic_lr=0.01")
    packed = _train(ray, model_dir, table, world=1, zero_stage=0, prefix_sharing=True, extra=extra, steps=2)
    padded = _train(ray, model_dir, table, world=1, zero_stage=0, prefix_sharing=False, extra=extra, steps=2)
    assert padded["stats"][M.CRITIC_VALUE_MEAN] != 0.0
    for key in (M.CRITIC_VALUE_MEAN, M.CRITIC_RETURN_MEAN, M.CRITIC_VALUE_LOSS, M.CRITIC_EXPLAINED_VARIANCE):
        assert packed["stats"][key] == pytest.approx(padded["stats"][key], rel=1e-4, abs=1e-6), key
    _assert_same_update(packed, padded, load_file(str(model_dir / "model.safetensors")))
