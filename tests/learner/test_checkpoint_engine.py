"""A DeepSpeed checkpoint round trip on 2 learner ranks under ZeRO-3 (the paper recipe's layout).

Ranks A train a step and save (every rank writes its shard); fresh ranks B load it through the
weights-only loader. Then A and B train the same next step: identical weights and loss mean the
weights, the partitioned Adam moments, the LR schedule and the version all came back.
Slow (four learner processes); the default suite resumes a ZeRO-0 run end to end
(tests/learner/test_resume_and_faults.py).
"""

from __future__ import annotations

import pytest
import torch

from common import metrics as M
from common.config import load_config
from learner.worker import LearnerWorker
from tests.learner.test_multirank import GROUPS, G, _free_port, _table


def _ranks(ray, model_dir, world: int, zero_stage: int) -> list:
    cfg = load_config(None, [f"learner.zero_stage={zero_stage}", f"learner.num_ranks={world}",
                             f"learner.prefix_sharing={str(zero_stage < 3).lower()}",
                             "learner.micro_batch_size=2", "learner.lr=0.01", "learner.warmup_steps=3",
                             "learner.torch_threads=1", f"algorithm.group_size={G}", f"algorithm.prompts_per_step={GROUPS}"])
    lc, a = cfg.learner, cfg.algorithm
    port = _free_port()
    return [ray.remote(LearnerWorker).options(num_cpus=1).remote(
        str(model_dir), learner={**vars(lc), "betas": list(lc.betas), "dtype": "float32"}, algorithm=vars(a),
        temperature=1.0, batch_episodes=GROUPS * G, rank=r, world_size=world, master_port=port, seed=r + 5)
        for r in range(world)]


def _weights(ray, ranks) -> dict[str, torch.Tensor]:
    buckets = ray.get([w.export_weights.remote(64 * 2**20) for w in ranks])[0]  # collective under ZeRO-3
    return {k: v.clone() for b in ray.get(buckets) for k, v in b.tensors().items()}


@pytest.mark.slow
def test_zero3_two_ranks_resume_takes_the_same_next_step(ray_local, tiny_policy, tmp_path):
    from common.modeling import load_tokenizer

    ray = ray_local
    ref = ray.put(_table(len(load_tokenizer(tiny_policy))))
    a = _ranks(ray, tiny_policy, 2, 3)
    try:
        ray.get([w.train_step.remote(ref) for w in a])
        ray.get([w.save_checkpoint.remote(str(tmp_path), {"version": 1}) for w in a])
        assert sorted(p.name for p in (tmp_path / "deepspeed").iterdir() if "optim" in p.name) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        next_a = ray.get([w.train_step.remote(ref) for w in a])
        weights_a = _weights(ray, a)
    finally:
        for w in a:
            ray.kill(w)
    b = _ranks(ray, tiny_policy, 2, 3)
    try:
        clients = ray.get([w.load_checkpoint.remote(str(tmp_path)) for w in b])
        assert [c["version"] for c in clients] == [1, 1]
        next_b = ray.get([w.train_step.remote(ref) for w in b])
        weights_b = _weights(ray, b)
    finally:
        for w in b:
            ray.kill(w)
    assert next_b[0][M.POLICY_VERSION] == next_a[0][M.POLICY_VERSION] == 2 and next_b[0][M.STEP] == 2
    assert next_b[0][M.LR] == pytest.approx(next_a[0][M.LR])  # warmup schedule position restored
    assert next_b[0][M.LOSS] == pytest.approx(next_a[0][M.LOSS], rel=1e-6)
    for k, w in weights_a.items():  # Adam moments restored too: the second update lands on the same weights
        torch.testing.assert_close(weights_b[k], w, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
