"""The learner rank (learner/worker.py) on rows from a real rollout: on-policy sanity, the live off-policy knobs.

Rows come from the real rollout worker and generator engine (in this process; a scripted env), the
learner is a real DeepSpeed rank in a Ray actor. Right after a rollout, with the generator's own
log-probs, the update starts exactly on-policy: ratio 1 and KL 0 up to float noise, at temperature 1
and at 0.7 with top-p (the generator records the log-prob of the temperature-scaled *unfiltered*
distribution, which is what the learner computes).
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from actors.engine import SamplingParams
from actors.generator import Generator
from actors.rollout import RolloutWorker
from common import metrics as M
from common import schema as S
from common.config import load_config
from learner.worker import LearnerWorker
from tests.actors.fakes import ListQueue, LocalHandle, ScriptedEnv
from tests.learner.test_multirank import _free_port

QUESTIONS, G = 3, 2


def rollout_table(policy, temperature: float, top_p: float, seed: int) -> pa.Table:
    gen = LocalHandle(Generator(str(policy), torch_threads=1))
    queue = ListQueue()
    worker = RolloutWorker(str(policy), [gen], [LocalHandle(ScriptedEnv(2))], LocalHandle(queue), run_id="t",
                           max_tokens_per_turn=8, max_tokens_per_episode=200)
    examples = [{"question": q} for q in ("Where is Karo Velmin from?", "Who is Karo?", "Born when?")]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=8, seed=seed, stop=["</tool>"])
    worker.run(examples, group_size=G, first_group_id=0, first_episode_id=0, params=params)
    return pa.Table.from_batches(queue.batches)


def learner(ray, policy, temperature: float, *overrides: str, **kwargs):
    cfg = load_config(None, ["learner.micro_batch_size=2", "learner.lr=0.01", "learner.torch_threads=1",
                             f"algorithm.group_size={G}", f"algorithm.prompts_per_step={QUESTIONS}", *overrides])
    lc, a = cfg.learner, cfg.algorithm
    return ray.remote(LearnerWorker).options(num_cpus=1).remote(
        str(policy), learner={**vars(lc), "betas": list(lc.betas), "dtype": "float32"}, algorithm=vars(a),
        temperature=temperature, batch_episodes=QUESTIONS * G, master_port=_free_port(), seed=0, **kwargs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_first_update_is_on_policy_with_the_generators_logprobs(ray_local, tiny_policy, temperature, top_p):
    ray = ray_local
    table = rollout_table(tiny_policy, temperature, top_p, seed=11)
    worker = learner(ray, tiny_policy, temperature)
    try:
        stats = ray.get(worker.train_step.remote(table))
    finally:
        ray.kill(worker)
    assert stats[M.LOGPROB_GAP_MAX] < 1e-5  # the learner's log-probs are the generator's, token for token
    assert abs(stats[M.KL]) < 1e-6 and abs(stats[M.KL_K3]) < 1e-6
    assert abs(stats[M.RATIO_MAX] - 1.0) < 1e-5 and stats[M.CLIP_FRAC] == 0.0  # one epoch: no step in between
    assert stats[M.IS_WEIGHT_MEAN] == pytest.approx(1.0)


def _stale(table: pa.Table, shift: float) -> pa.Table:
    """The same rows as if sampled by another policy (behaviour log-probs moved by ``shift`` nats, alternating),
    with outcomes that differ inside each group (the scripted env scores every episode alike)."""
    col = table.column(S.ACTION_LOGPROBS).to_pylist()
    moved = [[x + (shift if (i + j) % 2 else -shift) for j, x in enumerate(lp)] for i, lp in enumerate(col)]
    idx = table.schema.get_field_index(S.ACTION_LOGPROBS)
    table = table.set_column(idx, S.ACTION_LOGPROBS, pa.array(moved, type=pa.list_(pa.float32())))
    outcome = [float(e % 2) if last else 0.0 for e, last in zip(table.column(S.EPISODE_ID).to_pylist(),
                                                              table.column(S.IS_LAST_TURN).to_pylist())]
    idx = table.schema.get_field_index(S.OUTCOME_REWARD)
    return table.set_column(idx, S.OUTCOME_REWARD, pa.array(outcome, type=pa.float32()))


def test_off_policy_knobs_change_the_update(ray_local, tiny_policy):
    """On stale rows (behaviour log-probs that are not the learner's), recompute_old_logprobs, tis and
    decoupled each take a different step from the plain ratio against the generator's log-probs."""
    ray = ray_local
    table = _stale(rollout_table(tiny_policy, 1.0, 1.0, seed=5), shift=0.9)
    results = {}
    for name, extra in {"none": (), "recompute": ("learner.recompute_old_logprobs=true",),
                        "tis": ("algorithm.off_policy=tis",), "decoupled": ("algorithm.off_policy=decoupled",)}.items():
        worker = learner(ray, tiny_policy, 1.0, "algorithm.ppo_epochs=2", *extra)
        try:
            results[name] = ray.get(worker.train_step.remote(table))
        finally:
            ray.kill(worker)
    none, rec, tis, dec = (results[k] for k in ("none", "recompute", "tis", "decoupled"))
    assert none[M.LOGPROB_GAP_MEAN] == pytest.approx(0.9, abs=1e-4)  # the shift is what the learner sees
    assert none[M.CLIP_FRAC] > 0.2 and rec[M.CLIP_FRAC] < none[M.CLIP_FRAC]  # ratio against its own log-probs
    assert none[M.IS_WEIGHT_MEAN] == 1.0 and rec[M.IS_WEIGHT_MEAN] == 1.0
    # w = e^{+-0.9} = 2.46 or 0.41: tis truncates the first half at 2, decoupled drops it
    assert tis[M.IS_CAPPED_FRAC] == pytest.approx(dec[M.IS_CAPPED_FRAC]) and 0.3 < tis[M.IS_CAPPED_FRAC] < 0.7
    assert tis[M.IS_WEIGHT_MEAN] > dec[M.IS_WEIGHT_MEAN] > 0
    losses = [r[M.LOSS] for r in (none, rec, tis, dec)]
    assert len({round(x, 9) for x in losses}) == 4 and all(math.isfinite(x) for x in losses)


def test_lag_lr_scale_shrinks_the_step_on_stale_rows(ray_local, tiny_policy):
    """learner.lag_lr_scale: a batch whose oldest turn is L versions behind steps with lr * scale**L."""
    ray = ray_local
    table = rollout_table(tiny_policy, 1.0, 1.0, seed=7)  # version 0 rows
    lrs = {}
    for scale in (1.0, 0.5):
        worker = learner(ray, tiny_policy, 1.0, f"learner.lag_lr_scale={scale}")
        try:
            fresh = ray.get(worker.train_step.remote(table))  # learner at version 0: lag 0
            stale = ray.get(worker.train_step.remote(table))  # learner at version 1: the same rows lag by 1
        finally:
            ray.kill(worker)
        assert fresh[M.LR] == pytest.approx(0.01)
        lrs[scale] = stale[M.LR]
    assert lrs == {1.0: pytest.approx(0.01), 0.5: pytest.approx(0.005)}


def test_dr_grpo_normaliser_is_the_constant_episode_cap(ray_local, tiny_policy):
    """loss_agg seq-mean-token-sum-norm divides by generation.max_tokens_per_episode (what the driver passes),
    not by the batch's padded width, which changes from step to step."""
    from learner.batch import assemble

    ray = ray_local
    table = _stale(rollout_table(tiny_policy, 1.0, 1.0, seed=3), shift=0.0)  # varied outcomes, fresh log-probs
    width = assemble(table, 0).input_ids.shape[1]
    losses = {}
    for cap in (400, None):
        worker = learner(ray, tiny_policy, 1.0, "algorithm.loss_agg=seq-mean-token-sum-norm", loss_norm_len=cap)
        try:
            losses[cap] = ray.get(worker.train_step.remote(table))[M.LOSS]
        finally:
            ray.kill(worker)
    assert abs(losses[400]) > 1e-6 and width != 400
    assert losses[400] * 400 == pytest.approx(losses[None] * width, rel=1e-5)


def test_kl_to_the_frozen_reference_changes_the_update(ray_local, tiny_policy):
    """algorithm.kl_coef loads the starting policy as a frozen reference: KL 0 at the first step (policy ==
    reference), > 0 once the policy moved; three deterministic steps differ with and without it."""
    ray = ray_local
    table = _stale(rollout_table(tiny_policy, 1.0, 1.0, seed=13), shift=0.0)
    runs = {}
    for kl in (0.0, 0.5):
        extra = (f"algorithm.kl_coef={kl}", "algorithm.kl_kind=k2") if kl else ()
        worker = learner(ray, tiny_policy, 1.0, *extra)
        try:
            runs[kl] = [ray.get(worker.train_step.remote(table)) for _ in range(3)]
        finally:
            ray.kill(worker)
    without, with_kl = runs[0.0], runs[0.5]
    assert all(s[M.KL_REF] == 0.0 for s in without)
    assert with_kl[0][M.KL_REF] == pytest.approx(0.0, abs=1e-10) and with_kl[1][M.KL_REF] > 1e-6
    assert with_kl[0][M.LOSS] == pytest.approx(without[0][M.LOSS], abs=1e-7)  # no KL yet: the same first step
    assert with_kl[2][M.LOSS] != pytest.approx(without[2][M.LOSS], abs=1e-7)


def _truncate(table: pa.Table, which) -> pa.Table:
    """Mark the episodes ``which(episode_id)`` picks as truncated (on every row; the learner reads the last)."""
    flags = [bool(which(e)) for e in table.column(S.EPISODE_ID).to_pylist()]
    idx = table.schema.get_field_index(S.TRUNCATED)
    return table.set_column(idx, S.TRUNCATED, pa.array(flags, type=pa.bool_()))


def test_mask_truncated_takes_truncated_episodes_out_of_the_gradient(ray_local, tiny_policy):
    """algorithm.mask_truncated (DAPO's overlong filtering): truncated episodes carry no gradient; with every
    episode truncated the update is empty (zero loss and gradient), not a crash."""
    ray = ray_local
    base = _stale(rollout_table(tiny_policy, 1.0, 1.0, seed=17), shift=0.0)
    half = _truncate(base, lambda e: e % 2 == 0)
    runs = {}
    for name, table, extra in (("off", half, ()), ("on", half, ("algorithm.mask_truncated=true",)),
                               ("kept", _truncate(base, lambda e: False), ("algorithm.mask_truncated=true",)),
                               ("all", _truncate(base, lambda e: True), ("algorithm.mask_truncated=true",))):
        worker = learner(ray, tiny_policy, 1.0, *extra)
        try:
            runs[name] = ray.get(worker.train_step.remote(table))
        finally:
            ray.kill(worker)
    assert runs["off"][M.TRUNCATED_MASKED] == 0.0 and runs["on"][M.TRUNCATED_MASKED] == pytest.approx(0.5)
    assert runs["on"][M.LOSS] != pytest.approx(runs["off"][M.LOSS], abs=1e-7)
    assert runs["kept"][M.LOSS] == pytest.approx(runs["off"][M.LOSS], abs=1e-7)  # nothing truncated: unchanged
    assert runs["all"][M.TRUNCATED_MASKED] == 1.0
    assert runs["all"][M.LOSS] == 0.0 and runs["all"][M.GRAD_NORM] == 0.0


def _outcomes(table: pa.Table, value) -> pa.Table:
    """Outcome reward ``value(group_id)`` on every row (the learner reads the last turn's)."""
    vals = [float(value(g)) for g in table.column(S.GROUP_ID).to_pylist()]
    idx = table.schema.get_field_index(S.OUTCOME_REWARD)
    return table.set_column(idx, S.OUTCOME_REWARD, pa.array(vals, type=table.schema.field(idx).type))


def test_mt_ppo_trains_a_critic_beside_the_policy_and_checkpoints_it(ray_local, tiny_policy, tmp_path):
    """algorithm.advantage mt_ppo: the critic starts at V = 0 (zero head), its value loss falls over steps on
    the same batch (fixed Monte-Carlo targets at lam 1), its values move towards the returns; ppo (outcome only) gives another update; the critic
    is saved and restored with the learner's checkpoint (the next step's values are identical)."""
    ray = ray_local
    # the outcome depends on the question only, so a critic can predict it from the prompt
    table = _outcomes(_stale(rollout_table(tiny_policy, 1.0, 1.0, seed=19), shift=0.0), lambda g: 2.0 * (g % 2))
    extra = ("algorithm.advantage=mt_ppo", "algorithm.critic_lr=0.003", "algorithm.critic_value_clip=null")
    worker = learner(ray, tiny_policy, 1.0, *extra)
    try:
        steps = [ray.get(worker.train_step.remote(table)) for _ in range(6)]
        ray.get(worker.save_checkpoint.remote(str(tmp_path / "ck"), {"version": 6}))
        after_save = ray.get(worker.train_step.remote(table))
    finally:
        ray.kill(worker)
    assert steps[0][M.CRITIC_VALUE_MEAN] == 0.0  # zero-initialised head
    losses = [s[M.CRITIC_VALUE_LOSS] for s in steps]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses
    gaps = [abs(x[M.CRITIC_VALUE_MEAN] - x[M.CRITIC_RETURN_MEAN]) for x in steps]  # V moves towards the returns
    assert gaps[-1] < 0.5 * gaps[0], gaps
    restored = learner(ray, tiny_policy, 1.0, *extra)
    try:
        ray.get(restored.load_checkpoint.remote(str(tmp_path / "ck")))
        again = ray.get(restored.train_step.remote(table))
    finally:
        ray.kill(restored)
    assert again[M.CRITIC_VALUE_MEAN] == pytest.approx(after_save[M.CRITIC_VALUE_MEAN], abs=1e-6)
    assert again[M.LOSS] == pytest.approx(after_save[M.LOSS], abs=1e-6)
    outcome_only = learner(ray, tiny_policy, 1.0, "algorithm.advantage=ppo", "algorithm.critic_lr=0.003", "algorithm.critic_value_clip=null")
    try:
        first = ray.get(outcome_only.train_step.remote(table))
    finally:
        ray.kill(outcome_only)
    assert first[M.CRITIC_RETURN_MEAN] != pytest.approx(steps[0][M.CRITIC_RETURN_MEAN])  # no turn rewards in R
    assert first[M.LOSS] != pytest.approx(steps[0][M.LOSS], abs=1e-7)
