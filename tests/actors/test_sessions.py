"""The session API of the hf engine: continuous batching, KV kept across turns, exact tokens.

References are plain transformers: greedy ``model.generate`` on the full history, and a
fresh forward pass over the full sequence for log-probs.
"""

import pytest
import torch

from actors.engine import HFEngine, Request, SamplingParams
from actors.sampling import sample_rows, split_seed
from common.modeling import load_model, load_tokenizer

GREEDY = SamplingParams(greedy=True, max_new_tokens=10)


@pytest.fixture(scope="module")
def tok(tiny_policy):
    return load_tokenizer(tiny_policy)


@pytest.fixture()
def engine(tiny_policy, tok, device):
    eng = HFEngine(load_model(tiny_policy), tok, device=device)
    eng.eos_ids = set()  # compare raw decoding, no early EOS
    return eng


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _prompts(tok):
    return [_enc(tok, t) for t in ("Where is Karo Velmin from?", "Karo",
                                  "<reasoning>I should search.</reasoning><tool>{")]


def _observations(tok):
    return [_enc(tok, t) for t in ("<result>Karo Velmin is a baker</result>", "<result>Ralomek</result>",
                                  "<result>born in 1873. The answer</result>")]


def _hf_greedy(model, pad, history, n):
    ids = torch.tensor([history], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=pad)
    return out[0, len(history):].tolist()


def _fresh_logprobs(model, history, action, temperature):
    seq = torch.tensor([history + action], device=model.device)
    with torch.no_grad():
        logits = model(seq).logits[0, len(history) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, seq[0, len(history):, None]).squeeze(-1).cpu()


def test_greedy_equals_hf_generate_single_batched_and_across_turns(engine, tok):
    prompts, obs = _prompts(tok), _observations(tok)
    pad = tok.pad_token_id
    hist = [list(p) for p in prompts]
    for turn in range(3):
        batched = engine.generate_turns([Request(f"s{i}", h, GREEDY) for i, h in enumerate(hist)])
        for i, (h, o) in enumerate(zip(hist, batched)):
            assert o.token_ids == _hf_greedy(engine.model, pad, h, 10), (turn, i)
            assert o.version == 0 and o.session_id == f"s{i}"
            if turn:  # only the last action token + the observation were prefilled
                assert o.prefill_tokens == 1 + len(obs[i]) and o.cached_tokens == len(h) - o.prefill_tokens
        hist = [h + o.token_ids + obs[i] for i, (h, o) in enumerate(zip(hist, batched))]
    # one session alone (batch of one) continues exactly the same way
    single = engine.continue_("s1", obs[1], GREEDY)
    assert single.token_ids == _hf_greedy(engine.model, pad, hist[1], 10)
    assert single.prefill_tokens == 1 + len(obs[1])
    assert engine.history("s1") == hist[1] + single.token_ids


def test_session_path_equals_the_stateless_path(engine, tok):
    prompts, obs = _prompts(tok), _observations(tok)
    hist = [list(p) for p in prompts]
    for turn in range(2):
        caps = [3 + turn, 10, 6]
        old = engine.generate(hist, GREEDY, caps)
        new = engine.generate_turns([Request(f"e{i}", h, GREEDY, max_new_tokens=c)
                                     for i, (h, c) in enumerate(zip(hist, caps))])
        assert [o.token_ids for o in new] == [o.token_ids for o in old]
        assert [len(o.token_ids) for o in new] == caps
        for o, n in zip(old, new):
            assert torch.allclose(torch.tensor(n.logprobs), torch.tensor(o.logprobs), atol=1e-4)
        hist = [h + o.token_ids + obs[i] for i, (h, o) in enumerate(zip(hist, new))]
    engine._session_ok = False  # e.g. a sliding-window model: generate_turns falls back to full prefills
    fallback = engine.generate_turns([Request(f"e{i}", h, GREEDY) for i, h in enumerate(hist)])
    assert [o.token_ids for o in fallback] == [o.token_ids for o in engine.generate(hist, GREEDY)]
    assert all(o.cached_tokens == 0 for o in fallback)


def test_logprobs_match_a_fresh_forward_pass_across_turns(engine, tok):
    prompts, obs = _prompts(tok), _observations(tok)
    hist = [list(p) for p in prompts]
    params = [SamplingParams(temperature=0.7, max_new_tokens=8),
              SamplingParams(temperature=1.3, top_k=20, max_new_tokens=8),
              SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=8)]
    for turn in range(2):
        outs = engine.generate_turns([Request(f"l{i}", h, p, seed=100 * turn + i)
                                      for i, (h, p) in enumerate(zip(hist, params))])
        for h, o, p in zip(hist, outs, params):
            ref = _fresh_logprobs(engine.model, h, o.token_ids, p.temperature)
            assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)
        hist = [h + o.token_ids + obs[i] for i, (h, o) in enumerate(zip(hist, outs))]


def test_seeded_turns_do_not_depend_on_the_batch(engine, tok):
    prompts = _prompts(tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=8)
    alone = engine.generate_turns([Request("a", prompts[0], p, seed=7)])[0]
    mixed = engine.generate_turns([Request("b", prompts[1], p, seed=1), Request("c", prompts[0], p, seed=7),
                                   Request("d", prompts[2], p, seed=2)])
    assert mixed[1].token_ids == alone.token_ids
    other = engine.generate_turns([Request("e", prompts[0], p, seed=8)])[0]
    assert other.token_ids != alone.token_ids


def test_group_copies_share_the_prompt_prefill(engine, tok):
    prompt = _prompts(tok)[0]
    p = SamplingParams(temperature=1.0, max_new_tokens=6)
    before = engine.session_stats()["prefill_tokens"]
    outs = engine.generate_turns([Request(f"g{i}", prompt, p, seed=i) for i in range(4)])
    stats = engine.session_stats()
    assert stats["prefill_tokens"] - before == len(prompt)  # prefilled once for the 4 copies
    assert len({tuple(o.token_ids) for o in outs}) > 1  # yet sampled independently
    for o in outs:
        ref = _fresh_logprobs(engine.model, prompt, o.token_ids, 1.0)
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_later_turns_of_episodes_that_acted_alike_share_their_prefill(engine, tok):
    """Turn 2 of episodes with identical histories (same first action, same observation), each continuing
    its own cached session, is prefilled once; each still samples its own tokens with exact log-probs."""
    prompt, obs = _prompts(tok)[0], _observations(tok)[1]
    first = engine.generate_turns([Request(f"a{i}", prompt, GREEDY) for i in range(3)])  # greedy: same action
    assert len({tuple(o.token_ids) for o in first}) == 1
    history = prompt + first[0].token_ids + obs
    before = engine.session_stats()["prefill_tokens"]
    p = SamplingParams(temperature=1.0, max_new_tokens=6)
    second = engine.generate_turns([Request(f"a{i}", history, p, seed=10 + i) for i in range(3)])
    assert engine.session_stats()["prefill_tokens"] - before == 1 + len(obs)  # once for the three sessions
    assert all(o.cached_tokens == len(history) - 1 - len(obs) for o in second)  # each reused its own cache
    assert len({tuple(o.token_ids) for o in second}) > 1  # sampled independently
    for o in second:
        ref = _fresh_logprobs(engine.model, history, o.token_ids, 1.0)
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_stop_strings_and_caps(engine, tok):
    prompt = _prompts(tok)[0]
    free = engine.generate_turns([Request("f", prompt, SamplingParams(max_new_tokens=16), seed=5)])[0]
    text = tok.decode(free.token_ids)
    for end in range(3, 14):  # a two-token stop string whose first occurrence ends at token `end`
        stop = tok.decode(free.token_ids[end - 2:end])
        if stop.strip() and text.find(stop) == len(tok.decode(free.token_ids[:end - 2])):
            break
    else:
        pytest.skip("degenerate random output for this seed")
    out = engine.generate_turns([Request("f2", prompt, SamplingParams(max_new_tokens=16, stop=[stop]), seed=5)])[0]
    assert out.finish_reason == "stop" and tok.decode(out.token_ids).endswith(stop)
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and len(out.token_ids) <= end
    # a single-token stop (EOS-like) ends the turn on that token
    engine.eos_ids = {free.token_ids[2]}
    try:
        eos = engine.generate_turns([Request("f3", prompt, SamplingParams(max_new_tokens=16), seed=5)])[0]
    finally:
        engine.eos_ids = set()
    assert eos.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[2]) + 1]
    assert eos.finish_reason == "stop"
    # per-turn and per-episode caps
    capped = engine.generate_turns([Request("c1", prompt, GREEDY, max_new_tokens=3),
                                    Request("c2", prompt, GREEDY, max_total_tokens=len(prompt) + 5),
                                    Request("c3", prompt, GREEDY, max_total_tokens=len(prompt))])
    assert [len(o.token_ids) for o in capped] == [3, 5, 0]
    assert all(o.finish_reason == "length" for o in capped)


def test_token_budget_bounds_the_batch_and_eviction_falls_back_to_prefill(tiny_policy, tok, device):
    prompts, obs = _prompts(tok) * 2, _observations(tok) * 2
    ref_engine = HFEngine(load_model(tiny_policy), tok, device=device)
    ref_engine.eos_ids = set()
    longest = max(len(p) for p in prompts) + 10 + 1
    eng = HFEngine(load_model(tiny_policy), tok, device=device, kv_budget_tokens=2 * longest + 40)
    eng.eos_ids = set()
    caps = [2, 10, 4, 7, 10, 3]
    eng.submit([Request(f"s{i}", p, GREEDY, max_new_tokens=c) for i, (p, c) in enumerate(zip(prompts, caps))])
    done, most, queued_while_running = {}, 0, False
    while eng.has_work():
        for o in eng.step():
            done[o.session_id] = o
        st = eng.session_stats()
        most = max(most, st["running"])
        queued_while_running |= st["running"] > 0 and st["waiting"] > 0
        assert st["reserved_tokens"] <= eng.kv_budget_tokens
    assert 2 <= most < 6 and queued_while_running  # rows joined as others left, within the budget
    ref = ref_engine.generate(prompts, GREEDY, caps)
    assert [done[f"s{i}"].token_ids for i in range(6)] == [o.token_ids for o in ref]
    # second turn: the budget cannot hold every session's cache, so some are re-prefilled
    hist = [p + done[f"s{i}"].token_ids + obs[i] for i, p in enumerate(prompts)]
    outs = eng.generate_turns([Request(f"s{i}", h, GREEDY) for i, h in enumerate(hist)])
    st = eng.session_stats()
    assert st["evictions"] > 0
    assert any(o.cached_tokens == 0 for o in outs) and any(o.cached_tokens > 0 for o in outs)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref_engine.generate(hist, GREEDY)]
    assert st["cached_tokens"] + st["reserved_tokens"] <= eng.kv_budget_tokens


def test_weight_update_waits_for_running_turns_and_versions_outputs(tiny_policy, tok, device):
    eng = HFEngine(load_model(tiny_policy), tok, device=device)
    eng.eos_ids = set()
    prompts, obs = _prompts(tok), _observations(tok)
    old_state = {k: v.clone() for k, v in eng.model.state_dict().items()}
    torch.manual_seed(0)
    new_state = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in old_state.items()}
    ref_old = [_hf_greedy(eng.model, tok.pad_token_id, p, 10) for p in prompts]

    eng.submit([Request(f"w{i}", p, GREEDY) for i, p in enumerate(prompts)])
    first = eng.step()  # turns are now running
    assert not first and eng.session_stats()["running"] == 3
    assert eng.update_weights([new_state], version=1) is False  # staged: rows are mid-turn
    late = [list(prompts[0])]
    eng.submit([Request("late", late[0], GREEDY)])  # arrives while the update is pending
    outs = {}
    while eng.has_work():
        for o in eng.step():
            outs[o.session_id] = o
    for i in range(3):  # the in-flight turns finished under the weights they started with
        assert outs[f"w{i}"].version == 0 and outs[f"w{i}"].token_ids == ref_old[i]
    assert eng.version == 1 and outs["late"].version == 1
    assert outs["late"].token_ids == _hf_greedy(eng.model, tok.pad_token_id, prompts[0], 10)
    assert outs["late"].token_ids != ref_old[0]
    # next turn of an old session: its KV was computed by version 0, so it is re-prefilled
    hist = prompts[0] + outs["w0"].token_ids + obs[0]
    nxt = eng.generate_turns([Request("w0", hist, GREEDY)])[0]
    assert nxt.cached_tokens == 0 and nxt.version == 1
    assert nxt.token_ids == _hf_greedy(eng.model, tok.pad_token_id, hist, 10)
    # opting in to stale KV keeps it (and says so through cached_tokens)
    eng.keep_kv_across_versions = True
    eng.update_weights([old_state], version=2)
    hist2 = hist + nxt.token_ids + obs[1]
    kept = eng.generate_turns([Request("w0", hist2, GREEDY)])[0]
    assert kept.cached_tokens > 0 and kept.version == 2


def test_counter_based_sampling_follows_the_distribution():
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(n, 1)
    probs = torch.softmax(logits[0], -1)
    seeds = [split_seed(s) for s in range(n)]
    lo = torch.tensor([s[0] for s in seeds])
    hi = torch.tensor([s[1] for s in seeds])
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
    tok, lp = sample_rows(logits, ones, torch.zeros(n, dtype=torch.bool), zeros, ones, lo, hi, zeros, False)
    freq = torch.bincount(tok, minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(lp, torch.log(probs)[tok], atol=1e-5)
    # top-k = 2 and top-p = 0.5 only restrict the support; log-probs stay unfiltered
    tk, lpk = sample_rows(logits, ones, torch.zeros(n, dtype=torch.bool), torch.full((n,), 2), ones, lo, hi,
                          zeros, True)
    assert set(tk.tolist()) == {0, 1}
    assert torch.allclose(lpk, torch.log(probs)[tk], atol=1e-5)
    tp, _ = sample_rows(logits, ones, torch.zeros(n, dtype=torch.bool), zeros, torch.full((n,), 0.5), lo, hi,
                        zeros, True)
    assert set(tp.tolist()) == {0}
    # the same (seed, counter) gives the same token; another counter moves on
    again, _ = sample_rows(logits, ones, torch.zeros(n, dtype=torch.bool), zeros, ones, lo, hi, zeros, False)
    assert torch.equal(again, tok)
    nxt, _ = sample_rows(logits, ones, torch.zeros(n, dtype=torch.bool), zeros, ones, lo, hi, zeros + 1, False)
    assert not torch.equal(nxt, tok)
