"""The hf engine against plain transformers: greedy tokens, log-probs, stop strings."""

import pytest
import torch

from actors.engine import HFEngine, SamplingParams
from common.modeling import load_model, load_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_policy, device):
    tok = load_tokenizer(tiny_policy)
    model = load_model(tiny_policy)
    return HFEngine(model, tok, device=device)


def _prompts(tok):
    return [tok.encode(t, add_special_tokens=False) for t in (
        "Where is Karo Velmin from?", "Karo", "<reasoning>I should search.</reasoning><tool>{")]


def _hf_greedy(engine, prompt, n):
    ids = torch.tensor([prompt], device=engine.device)
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate_single_and_batched(engine):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(greedy=True, max_new_tokens=12)
    engine.eos_ids = set()  # compare raw decoding without early stops
    try:
        batched = engine.generate(prompts, params)
        for p, out in zip(prompts, batched):
            ref = _hf_greedy(engine, p, 12)
            single = engine.generate([p], params)[0]
            assert single.token_ids == ref
            assert out.token_ids == ref  # left padding in the batch changes nothing
    finally:
        engine.eos_ids = {engine.tokenizer.eos_token_id}


def test_logprobs_match_a_fresh_forward_pass(engine):
    prompts = _prompts(engine.tokenizer)
    outs = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=10, seed=3))
    for p, o in zip(prompts, outs):
        seq = torch.tensor([p + o.token_ids], device=engine.device)
        with torch.no_grad():
            logits = engine.model(seq).logits[0, len(p) - 1:-1] / 0.7
        ref = torch.log_softmax(logits.float(), -1).gather(-1, seq[0, len(p):, None]).squeeze(-1).cpu()
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_seeded_sampling_is_reproducible(engine):
    prompts = _prompts(engine.tokenizer)
    a = engine.generate(prompts, SamplingParams(max_new_tokens=8, seed=11))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=8, seed=11))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_stop_string_ends_the_action(engine):
    tok = engine.tokenizer
    prompt = _prompts(tok)[0]
    engine.eos_ids = set()
    try:
        free = engine.generate([prompt], SamplingParams(seed=5, max_new_tokens=16))[0]
        text = tok.decode(free.token_ids)
        # a two-token stop string whose first occurrence ends at token `end`
        for end in range(3, 12):
            stop = tok.decode(free.token_ids[end - 2:end])
            if stop.strip() and text.find(stop) == len(tok.decode(free.token_ids[:end - 2])):
                break
        else:
            pytest.skip("degenerate random output for this seed")
        out = engine.generate([prompt], SamplingParams(seed=5, max_new_tokens=16, stop=[stop]))[0]
        assert out.finish_reason == "stop"
        assert tok.decode(out.token_ids).endswith(stop)
        assert out.token_ids == free.token_ids[:len(out.token_ids)]
        assert len(out.token_ids) <= end
    finally:
        engine.eos_ids = {tok.eos_token_id}


def test_per_row_token_caps(engine):
    prompts = _prompts(engine.tokenizer)
    engine.eos_ids = set()
    try:
        outs = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=9), max_new_tokens=[2, 9, 5])
    finally:
        engine.eos_ids = {engine.tokenizer.eos_token_id}
    assert [len(o.token_ids) for o in outs] == [2, 9, 5]
    assert all(o.finish_reason == "length" for o in outs)


def test_weight_update_changes_output_and_version(engine):
    prompt = _prompts(engine.tokenizer)[0]
    before = engine.generate([prompt], SamplingParams(greedy=True, max_new_tokens=6))[0]
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    engine.load_state_dict(new, version=5)
    after = engine.generate([prompt], SamplingParams(greedy=True, max_new_tokens=6))[0]
    engine.load_state_dict(state, version=0)
    assert after.version == 5 and before.version == 0
    assert after.token_ids != before.token_ids or after.logprobs != before.logprobs
