"""The warm-start demonstrations: played through the real env, loss only on actions."""

import json
import random

import pytest

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
