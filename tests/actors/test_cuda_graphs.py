"""Decode steps replayed as CUDA graphs (actors/cuda_graphs.py) give what the eager engine gives.

The GPU tests are marked ``gpu`` (skipped without CUDA; ``tests/gpu_checks.sh`` runs them). The
references are plain transformers on the same device: greedy ``generate`` on the full history and
a fresh forward for log-probs.
"""

from __future__ import annotations

import pytest
import torch

from actors.engine import HFEngine, Request, SamplingParams
from common.modeling import load_model, load_tokenizer
from tests.actors.test_sessions import _fresh_logprobs, _hf_greedy

GREEDY = SamplingParams(greedy=True, max_new_tokens=10)
NO_CUDA = not torch.cuda.is_available()


def test_cuda_graphs_stay_off_without_a_gpu_or_the_lean_forward(tiny_policy):
    tok = load_tokenizer(tiny_policy)
    assert HFEngine(load_model(tiny_policy), tok, device="cpu", cuda_graphs=True).cuda_graphs is False
    modules = HFEngine(load_model(tiny_policy), tok, device="cpu", lean_forward=False, cuda_graphs=True)
    assert modules.cuda_graphs is False and modules.session_stats()["graph_replays"] == 0


@pytest.fixture()
def graphed(tiny_policy):
    tok = load_tokenizer(tiny_policy)
    eng = HFEngine(load_model(tiny_policy), tok, device="cuda", cuda_graphs=True)
    eng.eos_ids = set()
    assert eng.cuda_graphs
    return eng


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_prompts", [3, 6])
def test_graphed_greedy_turns_equal_hf_generate(graphed, n_prompts):
    tok = graphed.tokenizer
    texts = ["Where is Karo Velmin from?", "Karo", "<reasoning>I should search.</reasoning><tool>{"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in (texts * 2)[:n_prompts]]
    obs = tok.encode("<result>Karo Velmin is a baker from Ralomek</result>", add_special_tokens=False)
    hist = [list(p) for p in prompts]
    for turn in range(3):  # later turns reuse the KV cache; the slab grows, so graphs are captured again
        outs = graphed.generate_turns([Request(f"g{i}", h, GREEDY) for i, h in enumerate(hist)])
        for i, (h, o) in enumerate(zip(hist, outs)):
            assert o.token_ids == _hf_greedy(graphed.model, tok.pad_token_id, h, 10), (turn, i)
        hist = [h + o.token_ids + obs for h, o in zip(hist, outs)]
    stats = graphed.session_stats()
    assert stats["graph_replays"] > 0 and stats["graph_captures"] >= 1 and graphed.cuda_graphs


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_graphed_logprobs_and_weight_updates(graphed):
    tok = graphed.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Where is Karo", "Who is Karo Velmin?")]
    params = SamplingParams(temperature=0.8, max_new_tokens=8)
    outs = graphed.generate_turns([Request(f"l{i}", p, params, seed=i) for i, p in enumerate(prompts)])
    for p, o in zip(prompts, outs):
        assert torch.allclose(torch.tensor(o.logprobs), _fresh_logprobs(graphed.model, p, o.token_ids, 0.8), atol=1e-4)
    replays = graphed.session_stats()["graph_replays"]
    assert replays > 0
    # an in-place weight update reaches the captured graphs (same parameter storage)
    torch.manual_seed(0)
    new = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in graphed.model.state_dict().items()}
    assert graphed.update_weights([new], version=1)
    after = graphed.generate_turns([Request(f"w{i}", p, GREEDY) for i, p in enumerate(prompts)])
    for p, o in zip(prompts, after):
        assert o.version == 1 and o.token_ids == _hf_greedy(graphed.model, tok.pad_token_id, p, 10)
    assert graphed.session_stats()["graph_replays"] > replays

