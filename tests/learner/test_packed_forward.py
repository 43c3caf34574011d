"""The shared-prefix training forward (learner/packed_forward.py): the prefix tree, hand-worked, and its
hidden states and gradients against the transformers modules on a padded batch."""

from __future__ import annotations

import torch

from learner.packed_forward import PackedForward, PrefixTree

# five sequences: 0 and 3 identical; 1 leaves 0 after three tokens, 4 after four, 2 after one
SEQS = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12], [5, 13], [5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 14, 15, 16, 17]]


def test_prefix_tree_hand_worked() -> None:
    tree = PrefixTree.build(SEQS)
    # nodes in order of their owner, then depth: seq 0 owns 0-5, seq 1 owns 6-7, seq 2 owns 8, seq 3 none, seq 4 9-12
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert tree.depth.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 1, 4, 5, 6, 7]
    assert tree.owned.tolist() == [6, 2, 1, 0, 4] and tree.offset.tolist() == [0, 6, 8, 9, 9]
    assert tree.path[1, :5].tolist() == [0, 1, 2, 6, 7] and tree.path[3, :6].tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.path[4, :8].tolist() == [0, 1, 2, 3, 9, 10, 11, 12]
    assert tree.num_nodes == 13 < sum(map(len, SEQS)) == 27
    (one,) = tree.attention_buckets()  # tiny sequences: one attention call is cheapest
    # sorted by owned count; seq 3 owns nothing and computes no query
    assert one.q_index.shape == (4, 6) and one.mask.shape == (4, 1, 6, 8)
    assert one.q_index[:2].tolist() == [[8, 0, 0, 0, 0, 0], [6, 7, 0, 0, 0, 0]]  # seq 2, then seq 1
    assert one.mask[1, 0, 0].tolist() == [True] * 4 + [False] * 4  # seq 1's first query (position 3) reads 0..3
    assert one.mask[1, 0, 2].tolist() == [True] + [False] * 7  # a padded query reads key 0 only
    assert one.rows.tolist() == [0, 6, 7, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23]  # rows e*6+i with i < owned
    assert sorted(one.nodes.tolist()) == list(range(13))  # every node's output computed exactly once
    # with no cost per call, every sequence gets a bucket of its own (no padding at all)
    singles = tree.attention_buckets(call_cost=0.0)
    assert [b.q_index.shape for b in singles] == [(1, 1), (1, 2), (1, 4), (1, 6)]
    assert sorted(n for b in singles for n in b.nodes.tolist()) == list(range(13))


def _padded(seqs):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def test_hidden_states_and_gradients_equal_the_padded_modules(tiny_policy) -> None:
    from common.modeling import load_model

    model = load_model(str(tiny_policy)).float()
    assert PackedForward.build(model) is not None
    tree = PrefixTree.build(SEQS)
    ids, attn = _padded(SEQS)
    hidden = PackedForward().hidden(model, tree)  # [N, H]
    ref = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # [E, T, H]
    for e, s in enumerate(SEQS):
        torch.testing.assert_close(hidden[tree.path[e, : len(s)]], ref[e, : len(s)], rtol=0, atol=1e-5)
    # a loss over every sequence's next-token log-probs: same value, same parameter gradients
    head = model.get_output_embeddings()

    def loss_of(h_per_seq):
        return sum(torch.log_softmax(head(h[:-1]), -1).gather(-1, torch.tensor(s[1:])[:, None]).sum() * (e + 1)
                   for e, (s, h) in enumerate(zip(SEQS, h_per_seq)))

    model.zero_grad()
    loss_of([hidden[tree.path[e, : len(s)]] for e, s in enumerate(SEQS)]).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    loss_of([ref[e, : len(s)] for e, s in enumerate(SEQS)]).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_unsupported_architectures_are_refused(tiny_policy) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    assert PackedForward.build(gpt2) is None
