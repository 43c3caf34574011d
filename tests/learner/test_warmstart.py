"""The warm-start demonstrations: played through the real env, loss only on actions."""

import json
import random

import pytest
import torch

from env_workers.demo_data import generate_demo_data, load_questions
from env_workers.env import WikiSearchEnv
from env_workers.index import BM25Index
from learner import warmstart as W


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    paths = generate_demo_data(d, seed=1, num_people=60, num_cities=12, num_countries=4)
    return BM25Index.build(paths["corpus"]), load_questions(paths["train"]), paths


def test_demonstrations_mask_only_actions_and_copy_from_the_result(small_world, tiny_policy):
    from common.modeling import load_tokenizer

    index, train, _ = small_world
    tok = load_tokenizer(tiny_policy)
    one_hop = [q for q in train if q["hops"] == 1][:40]
    names = {"person": sorted({q["chain"][0] for q in train}), "city": []}
    demos = W.demonstrations(one_hop, lambda: WikiSearchEnv(index, max_turns=3), tok, seed=0,
                             domains=W._domains(train), names=names)
    assert len(demos) == len(one_hop)
    right = 0
    for q, (ids, mask) in zip(one_hop, demos):
        assert len(ids) == len(mask)
        text = tok.decode([i for i, m in zip(ids, mask) if m > 0])
        assert text.count("<tool>") == 1 and text.count("<answer>") == 1
        query = json.loads(text.split("<tool>")[1].split("</tool>")[0])["args"]["query"]
        hit = index.search([query], k=1)[0]
        answer = text.split("<answer>")[1].split("</answer>")[0]
        if hit and query == q["chain"][0]:
            right += 1
            assert W._read_attribute(hit[0].title + "\n" + hit[0].text, q["attribute"]) is not None
        # env / template tokens never carry loss
        context = tok.decode([i for i, m in zip(ids, mask) if m == 0])
        assert q["question"] in context and "<result>" in context
        assert answer  # an answer is always given
    # the demonstrator is imperfect on purpose, but not always wrong
    assert 0 < right < len(one_hop)


def test_demo_query_mixture():
    rng = random.Random(0)
    names = ["Ana Bel", "Cor Dan", "Eli Fen"]
    qs = [W._demo_query(rng, "Karo Velmin", names) for _ in range(2000)]
    frac_right = qs.count("Karo Velmin") / len(qs)
    frac_part = sum(q in ("Karo", "Velmin") for q in qs) / len(qs)
    assert abs(frac_right - W.P_RIGHT_QUERY) < 0.05
    assert abs(frac_part - W.P_PARTIAL_QUERY) < 0.05
    assert set(qs) - {"Karo Velmin", "Karo", "Velmin"} <= set(names)  # the rest: another entity's name


def test_expert_demonstrations_always_search_the_name_and_answer_right(small_world, tiny_policy):
    """Stage 1's demonstrator (p_right=1, p_garbled=0): every search hits, every answer is right."""
    from common.modeling import load_tokenizer
    from env_workers.rewards import exact_match

    index, train, _ = small_world
    tok = load_tokenizer(tiny_policy)
    one_hop = [q for q in train if q["hops"] == 1][:30]
    demos = W.demonstrations(one_hop, lambda: WikiSearchEnv(index, max_turns=3), tok, seed=0,
                             domains=W._domains(train), names={"person": ["Ana Bel"], "city": []}, p_right=1.0, p_partial=0.0, p_garbled=0.0)
    for q, (ids, mask) in zip(one_hop, demos):
        text = tok.decode([i for i, m in zip(ids, mask) if m > 0])
        query = json.loads(text.split("<tool>")[1].split("</tool>")[0])["args"]["query"]
        assert query == q["chain"][0]
        assert exact_match(text.split("<answer>")[1].split("</answer>")[0], q["answers"]), (q, text)


def test_copy_loss_scores_only_the_repeats():
    from common.modeling import build_demo_model

    model = build_demo_model(50, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=32, seed=0)
    got = W.copy_loss(model, torch.Generator().manual_seed(3), batch=4, span=5, token_range=(4, 50))
    x = torch.randint(4, 50, (4, 5), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([x, x, x], dim=1)  # [4, 15]
    logits = model(input_ids=ids).logits
    # positions 4..13 predict tokens 5..14: the second and third copies
    want = torch.nn.functional.cross_entropy(logits[:, 4:14].reshape(-1, 50), ids[:, 5:15].reshape(-1))
    assert torch.allclose(got, want)
    assert x.min() >= 4 and x.max() < 50


def test_sft_with_copy_batches_reports_global_steps(tiny_policy):
    from common.modeling import load_model

    model = load_model(tiny_policy)
    before = [p.detach().clone() for p in model.parameters()]
    examples = [([5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 1, 0]), ([5, 6, 7, 8], [0, 1, 1, 0])] * 4  # one per length bucket
    seen = []
    losses = W.sft(model, examples, steps=3, batch=2, lr=1e-3, seed=0, pad_id=0, copy_batch=2,
                   copy_range=(4, 40), on_step=lambda step, m: seen.append(step), step_offset=10)
    assert seen == [11, 12, 13]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)  # finite action losses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_expert_two_hop_demonstrations_copy_the_bridge_from_the_first_result(small_world, tiny_policy):
    """Stage 3's data: the second search is the home city, read from the first search's result."""
    from common.modeling import load_tokenizer

    index, train, _ = small_world
    tok = load_tokenizer(tiny_policy)
    two_hop = [q for q in train if q["hops"] == 2][:20]
    names = {"person": sorted({q["chain"][0] for q in train}), "city": sorted({q["chain"][1] for q in two_hop})}
    demos = W.demonstrations(two_hop, lambda: WikiSearchEnv(index, max_turns=3), tok, seed=0,
                             domains=W._domains(train), names=names, p_right=1.0, p_partial=0.0, p_garbled=0.0)
    for q, (ids, mask) in zip(two_hop, demos):
        actions = tok.decode([i for i, m in zip(ids, mask) if m > 0])
        queries = [json.loads(a.split("</tool>")[0])["args"]["query"] for a in actions.split("<tool>")[1:]]
        assert queries == q["chain"]  # person, then the bridge city
        context = tok.decode([i for i, m in zip(ids, mask) if m == 0])
        first_result = context.split(q["chain"][0])[-1]
        assert q["chain"][1] in context and q["chain"][1] in first_result


def test_multihop_warmstart_builds_deterministically(tiny_policy, tmp_path):
    from safetensors.torch import load_file

    from common.config import load_config

    cfg = load_config(None, [f"model.path={tiny_policy}", f"data.dir={tmp_path / 'data'}", "data.num_people=60"])
    a = W.build_multihop_warmstart(cfg, tmp_path / "a", steps=2, share=0.4)
    b = W.build_multihop_warmstart(cfg, tmp_path / "b", steps=2, share=0.4)
    wa, wb, w0 = (load_file(str(p / "model.safetensors")) for p in (a, b, tiny_policy))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same threads: the same weights
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # and it did train
    meta = json.loads((a / "warmstart.json").read_text())
    assert meta["steps"] == 2 and meta["two_hop_share"] == 0.4 and meta["base"] == str(tiny_policy)
    assert (a / "tokenizer.json").is_file()
