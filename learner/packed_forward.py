"""The learner's forward over a micro-batch's *distinct* tokens: a prefix shared by several episodes is
computed once, and its keys and values serve every episode that continues it.

The G episodes of a GRPO group share their prompt, every episode of a batch shares the system prompt,
and a peaked policy often repeats a whole search turn (same query, same result) inside a group. A
padded batch recomputes all of that once per episode. Here the micro-batch's sequences become a prefix
tree (:class:`PrefixTree`): one node per distinct (prefix, token), so each distinct prefix is embedded,
projected, attended from and pushed through the MLPs once. Attention stays per episode: an episode's
queries (the nodes it *owns*, i.e. visits first) read the keys and values of its whole root-to-leaf
path, causally by depth, so every node sees exactly the tokens it would see in its own padded row.
Logits are taken only at nodes that predict an action token (the LM head dominates small models), once
per node however many episodes pass through it.

The arithmetic per node is that of the transformers Qwen2/Llama modules (the same functions as
:mod:`actors.lean_forward`), so log-probs and gradients equal the padded path's up to float summation
order (``tests/learner/test_packed_forward.py``). Gradients of a shared node accumulate over every
episode that reads it, through autograd: exact, not an approximation.

Cost, per micro-batch of E episodes of lengths L_e with N distinct nodes (sum_e L_e >= N):
projections, MLPs and norms on N tokens instead of E * max L_e; attention on sum_e n_e * L_e
query-key pairs (n_e: nodes episode e owns), padded to E * max n_e * max L_e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors.lean_forward import LayerWeights, rms_norm, rotate_half, unsupported_reason


@dataclass
class PrefixTree:
    """The distinct prefixes of E token sequences.

    Nodes are numbered by owner (the first sequence that visits them), then by depth, so the nodes
    sequence e owns are the contiguous range ``[offset[e], offset[e] + owned[e])`` and are the last
    ``owned[e]`` positions of its path.

    Fields:
        tokens: long[N] token of each node.
        depth: long[N] position of each node in its sequences (0 = first token).
        path: long[E, L] node at each position of each sequence (0 past the sequence's end).
        lengths: long[E] sequence lengths L_e.
        owned: long[E] nodes owned by each sequence (n_e); ``lengths - owned`` is where they start.
        offset: long[E] first owned node of each sequence.
    """

    tokens: torch.Tensor
    depth: torch.Tensor
    path: torch.Tensor
    lengths: torch.Tensor
    owned: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def build(cls, sequences: list[list[int]]) -> "PrefixTree":
        children: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node
        tokens: list[int] = []
        depth: list[int] = []
        paths: list[list[int]] = []
        owned, offset = [], []
        for seq in sequences:
            node, path, first_new = -1, [], None
            for d, tok in enumerate(seq):
                key = (node, int(tok))
                nxt = children.get(key)
                if nxt is None:
                    nxt = children[key] = len(tokens)
                    tokens.append(int(tok))
                    depth.append(d)
                    if first_new is None:
                        first_new = nxt
                path.append(nxt)
                node = nxt
            n_new = len(tokens) - first_new if first_new is not None else 0
            owned.append(n_new)
            offset.append(first_new if first_new is not None else len(tokens))
            paths.append(path)
        width = max((len(p) for p in paths), default=0)
        path_t = torch.zeros(len(paths), max(width, 1), dtype=torch.long)
        for e, p in enumerate(paths):
            path_t[e, : len(p)] = torch.tensor(p, dtype=torch.long)
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), path_t,
                   torch.tensor([len(p) for p in paths], dtype=torch.long), torch.tensor(owned, dtype=torch.long),
                   torch.tensor(offset, dtype=torch.long))

    @classmethod
    def of_padded(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "PrefixTree":
        """The tree of a right-padded batch: row b's first ``attention_mask[b].sum()`` tokens."""
        lengths = attention_mask.sum(dim=1).tolist()
        return cls.build([input_ids[b, :n].tolist() for b, n in enumerate(lengths)])

    def padded_path(self, width: int) -> torch.Tensor:
        """long[B, width]: the node of every position of the padded batch (0 past a row's end)."""
        path = torch.zeros(self.path.shape[0], width, dtype=torch.long)
        path[:, : self.path.shape[1]] = self.path[:, :width]
        return path

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.numel())

    def attention_buckets(self, pair_cost: float = 1.0, call_cost: float = 20000.0) -> list["AttentionBucket"]:
        """The per-sequence attention, in buckets of sequences with similar owned counts.

        One padded attention call over all sequences would pad every sequence's queries to the
        largest owned count (the first episode of a group owns its whole path; a repeat of a search
        turn owns only its answer). Sequences sorted by owned count are cut into contiguous buckets
        by dynamic programming, minimising ``pair_cost * sum_b E_b * S_b * L_b + call_cost * buckets``
        (query-key pairs computed, padding included, plus a fixed cost per attention call).
        """
        e_n = int(self.lengths.numel())
        order = sorted(range(e_n), key=lambda e: (int(self.owned[e]), int(self.lengths[e])))
        order = [e for e in order if int(self.owned[e]) > 0]  # a sequence fully shared owns no query
        own = [int(self.owned[e]) for e in order]
        ln = [int(self.lengths[e]) for e in order]
        n = len(order)
        best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sequences
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            longest = 0
            for i in range(j, 0, -1):  # bucket = order[i-1 : j]; own is sorted, so S = own[j-1]
                longest = max(longest, ln[i - 1])
                c = best[i - 1] + pair_cost * (j - i + 1) * own[j - 1] * longest + call_cost
                if c < best[j]:
                    best[j], cut[j] = c, i - 1
        bounds, j = [], n
        while j > 0:
            bounds.append((cut[j], j))
            j = cut[j]
        return [AttentionBucket.of(self, order[i:j]) for i, j in reversed(bounds)]


@dataclass
class AttentionBucket:
    """Attention of some sequences of a :class:`PrefixTree` in one padded call.

    Fields:
        q_index: long[E_b, S] nodes whose queries each sequence computes (its owned range; padded with node 0).
        k_index: long[E_b, L] nodes of each sequence's path (keys and values; padded with node 0).
        mask: bool[E_b, 1, S, L] which keys each query reads: causal by depth within the path; a padded
            query reads key 0 only, so that no softmax row is empty.
        rows: long[R] the valid query rows of the flattened ``[E_b * S]`` output ...
        nodes: long[R] ... and the node each of them is.
    """

    q_index: torch.Tensor
    k_index: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    nodes: torch.Tensor

    @classmethod
    def of(cls, tree: PrefixTree, seqs: list[int]) -> "AttentionBucket":
        idx = torch.tensor(seqs, dtype=torch.long)
        owned, lengths, offset = tree.owned[idx], tree.lengths[idx], tree.offset[idx]
        s, width = int(owned.max()), int(lengths.max())
        i = torch.arange(s)  # [S]
        q_valid = i[None, :] < owned[:, None]  # [E_b, S]
        q_index = torch.where(q_valid, offset[:, None] + i[None, :], torch.zeros_like(q_valid, dtype=torch.long))
        q_pos = (lengths - owned)[:, None] + i[None, :]  # [E_b, S] path position of each query
        j = torch.arange(width)  # [L]
        mask = j[None, None, :] <= q_pos[:, :, None]  # [E_b, S, L] causal by position
        mask = torch.where(q_valid[:, :, None], mask, j[None, None, :] == 0)
        rows = (torch.arange(len(seqs))[:, None] * s + i[None, :])[q_valid]  # [R]
        return cls(q_index, tree.path[idx, :width], mask[:, None], rows, q_index[q_valid])


class PackedForward:
    """Hidden states of every node of a :class:`PrefixTree` through a Qwen2/Llama decoder's own parameters.

    Build it with :meth:`build` (None for architectures it does not mirror); call it with the model each
    time (the parameter objects are read per call, so optimizer and DeepSpeed updates are always seen).
    """

    @classmethod
    def build(cls, model) -> "PackedForward | None":
        return cls() if unsupported_reason(model) is None else None

    def hidden(self, model, tree: PrefixTree) -> torch.Tensor:
        """Final-norm hidden states float[N, hidden] of the tree's nodes (autograd through the parameters)."""
        cfg = model.config.get_text_config(decoder=True)
        base = model.model
        device = base.embed_tokens.weight.device
        heads = cfg.num_attention_heads
        kvh = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        groups = heads // kvh
        scaling = base.layers[0].self_attn.scaling
        buckets = tree.attention_buckets()
        n = tree.num_nodes
        h = base.embed_tokens(tree.tokens.to(device))[None]  # [1, N, H]
        cos, sin = base.rotary_emb(h, tree.depth.to(device)[None])  # [1, N, hd]
        cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, hd]
        h = h[0]  # [N, H]
        layout = []  # per bucket: (query nodes, key nodes, additive mask, valid output rows)
        for b in buckets:
            mask = torch.zeros(b.mask.shape, dtype=h.dtype, device=device).masked_fill_(~b.mask.to(device), float("-inf"))
            layout.append((b.q_index.to(device), b.k_index.to(device), mask, b.rows.to(device)))
        # the buckets' valid rows, concatenated, are the nodes in this order; put them back in node order
        back = torch.argsort(torch.cat([b.nodes for b in buckets])).to(device)  # [N]
        for layer in base.layers[: cfg.num_hidden_layers]:
            L = LayerWeights(layer)
            x = rms_norm(h, L.ln1, L.eps1)
            q = F.linear(x, L.q, L.qb).view(n, heads, hd)  # [N, heads, hd]
            k = F.linear(x, L.k, L.kb).view(n, kvh, hd)  # [N, kvh, hd]
            v = F.linear(x, L.v, L.vb).view(n, kvh, hd)
            q = (q * cos) + (rotate_half(q) * sin)
            k = (k * cos) + (rotate_half(k) * sin)
            outs = []
            for q_index, k_index, mask, rows in layout:
                e_n, s = q_index.shape
                width = k_index.shape[1]
                qs = q.index_select(0, q_index.reshape(-1)).view(e_n, s, heads, hd).transpose(1, 2)  # [E_b, heads, S, hd]
                ks = k.index_select(0, k_index.reshape(-1)).view(e_n, width, kvh, hd).transpose(1, 2)  # [E_b, kvh, L, hd]
                vs = v.index_select(0, k_index.reshape(-1)).view(e_n, width, kvh, hd).transpose(1, 2)
                if groups > 1:
                    ks = ks[:, :, None].expand(e_n, kvh, groups, width, hd).reshape(e_n, heads, width, hd)
                    vs = vs[:, :, None].expand(e_n, kvh, groups, width, hd).reshape(e_n, heads, width, hd)
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, scale=scaling)
                outs.append(out.transpose(1, 2).reshape(e_n * s, heads * hd).index_select(0, rows))  # [R, heads*hd]
            attn = torch.cat(outs).index_select(0, back)  # [N, heads*hd] node order
            h = h + F.linear(attn, L.o, L.ob)
            x = rms_norm(h, L.ln2, L.eps2)
            h = h + F.linear(L.act(F.linear(x, L.gate, L.gb)) * F.linear(x, L.up, L.ub), L.down, L.db)
        return rms_norm(h, base.norm.weight, base.norm.variance_epsilon)
