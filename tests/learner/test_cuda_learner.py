"""The GPU path of the learner: DeepSpeed on CUDA, weights into a CUDA engine, NCCL broadcast.

Marked ``gpu``: skipped without a CUDA device (CI, the dev box); run on a GPU machine with
``tests/gpu_checks.sh``. The CPU suite covers the same code on the CPU accelerator with gloo.
"""

from __future__ import annotations

import os

import pytest
import torch

from actors.engine import HFEngine, SamplingParams
from actors.weights import WeightGroup, pack_buckets, plan_buckets
from common import metrics as M
from common.config import load_config
from common.modeling import load_model, load_tokenizer
from tests.learner.test_multirank import GROUPS, G, _free_port, _table

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def learner(tiny_policy):
    """One bf16 DeepSpeed rank on the GPU (the cluster recipe's dtype), ZeRO-0."""
    os.environ["DS_ACCELERATOR"] = "cuda"
    from learner.worker import LearnerWorker

    cfg = load_config(None, ["learner.micro_batch_size=2", "learner.lr=0.01", "learner.warmup_steps=0",
                             f"algorithm.group_size={G}", f"algorithm.prompts_per_step={GROUPS}"])
    lc, a = cfg.learner, cfg.algorithm
    return LearnerWorker(str(tiny_policy), learner={**vars(lc), "betas": list(lc.betas), "dtype": "bfloat16"},
                         algorithm=vars(a), temperature=1.0, batch_episodes=GROUPS * G, master_port=_free_port())


def test_deepspeed_step_on_cuda_in_bf16(learner, tiny_policy):
    params = list(learner.engine.module.parameters())
    assert all(p.is_cuda for p in params) and params[0].dtype == torch.bfloat16
    before = learner.state_dict()
    stats = learner.train_step(_table(len(load_tokenizer(tiny_policy))))
    after = learner.state_dict()
    assert learner.version == 1 and torch.isfinite(torch.tensor(stats[M.LOSS]))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, changed  # the step moved most tensors
    assert all(v.device.type == "cpu" for v in after.values())  # export copies to host memory


def test_weights_reach_a_cuda_engine_exactly(learner, tiny_policy):
    tok = load_tokenizer(tiny_policy)
    engine = HFEngine(load_model(tiny_policy), tok, device="cuda")
    state = learner.state_dict()
    prompt = tok.encode("Where is Karo Velmin from?", add_special_tokens=False)
    before = engine.generate([prompt], SamplingParams(greedy=True, max_new_tokens=6))[0]
    assert engine.update_weights(pack_buckets(state, bucket_bytes=16 * 1024), version=learner.version)
    for name, p in engine.model.state_dict().items():
        assert torch.equal(p, state[name].to(p.device, p.dtype)), name
    after = engine.generate([prompt], SamplingParams(greedy=True, max_new_tokens=6))[0]
    assert after.version == learner.version == 1 and before.version == 0
    # the engine's log-probs are the learner's own model's (bf16 weights run in fp32 here)
    seq = torch.tensor([prompt + after.token_ids], device="cuda")
    with torch.no_grad():
        logits = learner.engine.module(seq).logits[0, len(prompt) - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1).cpu()
    assert torch.allclose(torch.tensor(after.logprobs), ref, atol=0.05)  # bf16 activations vs fp32


def test_nccl_weight_group_from_the_cuda_learner(learner):
    """The learner hosts an NCCL weight group and broadcasts from its CUDA parameters (one rank:
    a single GPU cannot hold two NCCL ranks; the two-rank test below needs two GPUs)."""
    learner.init_weight_group("127.0.0.1", _free_port(), 1, "nccl", timeout_s=60)
    assert learner.broadcast_weights(bucket_bytes=32 * 1024) == learner.version
    learner._weight_group.close()


def _two_rank_worker(rank: int, port: int, devices: list[str], out: str) -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 64), "b": torch.randn(64).to(torch.bfloat16), "i": torch.arange(5)}
    group = WeightGroup("127.0.0.1", port, rank, 2, backend="nccl", timeout_s=60, device=devices[rank])
    if rank == 0:
        group.send({k: v.to(devices[0]) for k, v in state.items()}, bucket_bytes=4096)
    else:
        got = {k: v.cpu() for b in group.recv(plan_buckets(state, 4096)) for k, v in b.tensors().items()}
        torch.save({k: torch.equal(got[k], v) for k, v in state.items()}, out)
    group.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two NCCL ranks need two GPUs")
def test_nccl_broadcast_between_two_processes(tmp_path):
    out = str(tmp_path / "equal.pt")
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), ["cuda:0", "cuda:1"], out), nprocs=2)
    assert torch.load(out, weights_only=True) == {"w": True, "b": True, "i": True}
