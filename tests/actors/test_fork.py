"""``HFEngine.fork``: children of a session share its KV prefix and decode exactly what independent
sessions with the same history and seeds decode (tree rollouts, rollout.tree)."""

import pytest
import torch

from actors.engine import HFEngine, Request, SamplingParams
from common.modeling import load_model, load_tokenizer

SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def tok(tiny_policy):
    return load_tokenizer(tiny_policy)


def _engine(tiny_policy, tok, device, **kw):
    eng = HFEngine(load_model(tiny_policy), tok, device=device, **kw)
    eng.eos_ids = set()  # compare raw decoding, no early EOS
    return eng


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _parent(eng, tok):
    """A parent session after one sampled turn; returns (history sent to its children, observation)."""
    prompt = _enc(tok, "Where is Karo Velmin from?")
    first = eng.generate_turns([Request("p", prompt, SAMPLED, seed=3)])[0]
    obs = _enc(tok, "<result>Karo Velmin is a baker from Ralomek</result>")
    return prompt + first.token_ids + obs, obs


@pytest.mark.parametrize("copy_kv", [False, True])
def test_forked_children_decode_what_independent_sessions_decode(tiny_policy, tok, device, copy_kv):
    forked = _engine(tiny_policy, tok, device)
    history, obs = _parent(forked, tok)
    given = forked.fork("p", ["c1", "c2", "c3"], copy_kv=copy_kv)
    cached = len(history) - len(obs) - 1  # prompt + all but the last action token were fed
    assert given == 3 * cached
    if not copy_kv:  # copy on write: the children hold the parent's own tensors
        assert forked._sessions["c1"].kv[0][0] is forked._sessions["p"].kv[0][0]
    before = forked.session_stats()["prefill_tokens"]
    kids = forked.generate_turns([Request(f"c{i}", history, SAMPLED, seed=20 + i) for i in (1, 2, 3)])
    # every child reused the shared prefix; the rest (last action token + observation) was prefilled once
    assert all(o.cached_tokens == cached for o in kids)
    assert forked.session_stats()["prefill_tokens"] - before == len(history) - cached
    assert forked.session_stats()["forked_sessions"] == 3
    assert len({tuple(o.token_ids) for o in kids}) > 1  # each child samples its own continuation

    alone = _engine(tiny_policy, tok, device)  # independent sessions: each replays the parent's turn itself
    _parent(alone, tok)
    ref = []
    for i in (1, 2, 3):
        prompt_len = len(_enc(tok, "Where is Karo Velmin from?"))
        out = alone.generate_turns([Request(f"i{i}", history[:prompt_len], SAMPLED, seed=3)])[0]
        assert history[prompt_len:prompt_len + len(out.token_ids)] == out.token_ids
        ref.append(alone.generate_turns([Request(f"i{i}", history, SAMPLED, seed=20 + i)])[0])
    for k, r in zip(kids, ref):
        assert k.token_ids == r.token_ids
        assert torch.allclose(torch.tensor(k.logprobs), torch.tensor(r.logprobs), atol=1e-5)


def test_a_child_grows_its_own_cache_and_the_parent_keeps_its_own(tiny_policy, tok, device):
    eng = _engine(tiny_policy, tok, device)
    history, _ = _parent(eng, tok)
    parent_kv = [(k.clone(), v.clone()) for k, v in eng._sessions["p"].kv]
    eng.fork("p", ["c"])
    child = eng.generate_turns([Request("c", history, SAMPLED, seed=5)])[0]
    # the parent's cache is untouched by the child's turn (nothing is written in place)
    for (k0, v0), (k1, v1) in zip(parent_kv, eng._sessions["p"].kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert len(eng._sessions["c"].tokens) == len(history) + len(child.token_ids) - 1
    again = eng.generate_turns([Request("p", history, SAMPLED, seed=5)])[0]  # the parent, same seed
    assert again.token_ids == child.token_ids


def test_fork_of_a_session_without_kv_falls_back_to_prefill(tiny_policy, tok, device):
    eng = _engine(tiny_policy, tok, device)
    history, _ = _parent(eng, tok)
    assert eng.fork("nobody", ["x"]) == 0 and "x" not in eng._sessions
    eng.load_state_dict({}, version=1)  # a new version drops every cached KV
    assert eng.fork("p", ["c"]) == 0
    out = eng.generate_turns([Request("c", history, SAMPLED, seed=5)])[0]
    assert out.cached_tokens == 0 and out.prefill_tokens == len(history)
