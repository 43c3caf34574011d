"""The demo warm start: tokenizer + tiny Qwen2 + a short SFT on imperfect demonstrations.

The demonstrations imitate a weak base model: the format is always right, but the
search query is often wrong (another person's name, or only part of the name), and
the answer is copied from *whatever* article came back (sometimes garbled). RL must
then learn to search for the right entity; the answer turn already knows how to read
a result. Demonstrations are played through the real environment and tokenised the
way the rollout worker does it (chat template + observation glue), so SFT and RL see
identical token layouts.

Regenerate the shipped checkpoint with ``turnrl warmstart --config deploy/configs/local.yaml``.
Deterministic for a given seed, torch version and thread count.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from common.config import Config
from common.modeling import SPECIAL_TOKENS, build_demo_model, load_tokenizer, observation_glue, train_demo_tokenizer
from env_workers.corpus import load_corpus
from env_workers.demo_data import load_questions
from env_workers.env import DEFAULT_SYSTEM_PROMPT, WikiSearchEnv
from env_workers.index import BM25Index
from env_workers.prepare import prepare_data

log = logging.getLogger(__name__)

# The warm start has two supervised stages.
#  1. "Pretraining" stand-in: an expert demonstrator (always the exact name, answer read from
#     the result) plus a copy task on random token strings. A base LLM can already copy text
#     from its context; a 1M-parameter model trained from scratch cannot, and without that
#     skill no amount of RL can fix a search for a held-out name. Measured: loss on the
#     demonstrations alone left p(right first name) at chance (0.01) after 600 steps, even with
#     expert demonstrations; with the copy batches added it jumped to 0.92 between steps 250
#     and 400.
#  2. A short SFT on imperfect demonstrations at a 4x lower learning rate: the format is
#     always right but the search is often wrong (another person's name, or only part of the
#     name) and answers are sometimes garbled. It keeps the copying skill (greedy decoding
#     still copies the name) but spreads the sampling distribution over memorised names, so a
#     sampled search hits the right article rarely: that is what RL has to fix. Measured on
#     held-out questions: after stage 1, sampled answer-in-result 0.61 / greedy 0.98; after
#     100 stage-2 steps 0.07 / 0.99. At the stage-1 learning rate, 50 stage-2 steps wiped
#     the skill (greedy 0.31), and so did "topic" searches (the question without the name).
EXPERT_STEPS = 400
SFT_STEPS = 100
SFT_LR = 2e-3  # stage 1
SFT_LR_IMPERFECT = 5e-4  # stage 2
# How the imperfect demonstrator of stage 2 behaves (the imperfections RL has to fix).
P_RIGHT_QUERY = 0.3  # fraction of searches that use the exact entity name
P_PARTIAL_QUERY = 0.7  # searches that use only the first or last name part (ambiguous)
P_GARBLED_ANSWER = 0.1  # answers replaced by a random value of the right kind
TWO_HOP_FRACTION = 0.15  # share of two-hop demonstrations (for the multi-hop task)
# Stage 3, for the multi-hop task only (``--multi-hop``, deploy/warmstart_multihop): from the shipped checkpoint, a short
# SFT at stage 2's rate on *expert* two-hop demonstrations (the second search copies the city from the first result)
# beside stage 2's imperfect one-hop ones, with copy batches. docs/notes/warm-start.md has the measurements.
MULTI_HOP_STEPS = 250
MULTI_HOP_SHARE = 0.4  # share of expert two-hop demonstrations in stage 3's mix
SFT_BATCH = 32
COPY_BATCH = 32  # copy-task sequences added to every SFT step (both stages)
COPY_SPAN = 24  # random tokens per copy-task segment (each sequence is the segment three times)
VOCAB_SIZE = 1000

_EXTRACT = {
    "city": r" from (\w+)\.",
    "birth_year": r" was born in (\d+)\.",
    "occupation": r" is an? (\w+) from",
    "colour": r" favourite colour is (\w+)\.",
    "instrument": r" plays the (\w+)\.",
    "country": r" is a city in (\w+)\.",
    "city_founded": r" was founded in (\d+)\.",
}
THINK_SEARCH = "<reasoning>I should search.</reasoning>"
THINK_ANSWER = "<reasoning>I found it.</reasoning>"


def tool_call(query: str) -> str:
    return json.dumps({"name": "wiki_search", "args": {"query": query}})


def _demo_query(rng: random.Random, target: str, names: list[str], p_right: float = P_RIGHT_QUERY,
                p_partial: float = P_PARTIAL_QUERY) -> str:
    """The exact name, one part of it, or another entity's name from ``names``."""
    u = rng.random()
    if u < p_right:
        return target
    if u < p_right + p_partial and " " in target:
        return rng.choice(target.split(" "))
    return rng.choice(names)


def _read_attribute(result: str, attribute: str) -> str | None:
    m = re.search(_EXTRACT[attribute], result)
    return m.group(1) if m else None


def demonstrations(questions: list[dict], env_factory, tokenizer, seed: int, domains: dict[str, list[str]],
                   names: dict[str, list[str]], *, p_right: float = P_RIGHT_QUERY, p_partial: float = P_PARTIAL_QUERY,
                   p_garbled: float = P_GARBLED_ANSWER) -> list[tuple[list[int], list[float]]]:
    """Play scripted episodes through the env; return (token ids, loss mask) pairs.

    A search uses the exact name with probability ``p_right``, one part of it with
    ``p_partial``, else another entity's name (a person, or a city on the second hop); the answer is read from whatever came back
    and replaced by a random value of the right kind with probability ``p_garbled``.
    ``p_right=1, p_garbled=0`` is the expert of stage 1.
    """

    rng = random.Random(seed)
    out = []
    for q in questions:
        env = env_factory()
        messages = env.reset(q)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        mask = [0.0] * len(ids)
        chain = list(q.get("chain") or [q.get("entity", "")])
        result = ""
        for hop, target in enumerate(chain):
            query = _demo_query(rng, target, names["person"] if hop == 0 else names["city"], p_right, p_partial)
            action = f"{THINK_SEARCH}<tool>{tool_call(query)}</tool>"
            res = env.step(action)
            a_ids = tokenizer.encode(action, add_special_tokens=False)
            ids += a_ids
            mask += [1.0] * len(a_ids)
            if res.done:
                break
            glue = observation_glue(tokenizer, messages, action, res.observation_text, False)
            g_ids = tokenizer.encode(glue, add_special_tokens=False)
            ids += g_ids
            mask += [0.0] * len(g_ids)
            messages = messages + [{"role": "assistant", "content": action},
                                   {"role": "user", "content": res.observation_text}]
            result = res.observation_text
        else:
            value = _read_attribute(result, q["attribute"])
            if value is None or rng.random() < p_garbled:
                value = rng.choice(domains[q["attribute"]])
            action = f"{THINK_ANSWER}<answer>{value}</answer>"
            a_ids = tokenizer.encode(action, add_special_tokens=False)
            ids += a_ids
            mask += [1.0] * len(a_ids)
        out.append((ids, mask))
    return out


def _names_and_envs(cfg: Config, corpus, index):
    """Entity names by kind (the imperfect demonstrator's wrong searches) and a factory of demo envs."""
    titles, ids = corpus.column("title").to_pylist(), corpus.column("id").to_pylist()
    names = {"person": [t for t, i in zip(titles, ids) if i.startswith("person")],
             "city": [t for t, i in zip(titles, ids) if i.startswith("city")]}
    sys_prompt = cfg.env.system_prompt or DEFAULT_SYSTEM_PROMPT
    return names, lambda: WikiSearchEnv(index, system_prompt=sys_prompt, max_turns=3, top_k=cfg.env.top_k,
                                        max_result_chars=cfg.env.max_result_chars)


def _domains(train: list[dict]) -> dict[str, list[str]]:
    dom: dict[str, set[str]] = {}
    for q in train:
        dom.setdefault(q["attribute"], set()).add(q["answers"][0])
    return {k: sorted(v) for k, v in dom.items()}


def copy_loss(model, g: torch.Generator, *, batch: int, span: int, token_range: tuple[int, int]) -> torch.Tensor:
    """Next-token loss on ``[x, x, x]`` for random token strings ``x`` of length ``span``.

        loss = mean_{t >= span} NLL(x_t | x_<t)      ids: [batch, 3 * span]

    Only copying can predict the repeats, so this grows the attention heads and the
    embedding -> same-token logit circuit that a pretrained base model already has.
    Tokens are drawn from ``token_range`` (the learned BPE vocabulary, no special tokens).
    """
    x = torch.randint(token_range[0], token_range[1], (batch, span), generator=g)
    ids = torch.cat([x, x, x], dim=1)
    logits = model(input_ids=ids).logits[:, span - 1:-1]  # [batch, 2 * span, V]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, span:])


def sft(model, examples: list[tuple[list[int], list[float]]], *, steps: int, batch: int, lr: float, seed: int,
        pad_id: int, copy_batch: int = 0,
        copy_range: tuple[int, int] = (0, 0), on_step=None, step_offset: int = 0) -> list[float]:
    """Next-token SFT on demonstrations; returns the curve of the action-token loss.

        loss = mean_{t in actions} NLL_t + copy_loss(copy_batch random sequences)   (if copy_batch > 0)

    Batches are drawn from length buckets (short one-hop vs long two-hop conversations) so
    little compute goes to padding. The learning rate warms up for 50 steps and then stays
    constant, so a run of N steps is exactly the first N steps of a longer one.
    ``on_step(step_offset + step, model)`` is called after every optimiser step (snapshots, probes).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    n_buckets = 8
    buckets = [order[k * len(order) // n_buckets:(k + 1) * len(order) // n_buckets] for k in range(n_buckets)]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    model.train()
    losses = []
    for step in range(steps):
        bucket = buckets[int(torch.randint(n_buckets, (1,), generator=g))]
        idx = [bucket[j] for j in torch.randint(len(bucket), (batch,), generator=g).tolist()]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.bool)
        attn = torch.zeros(batch, width, dtype=torch.long)
        for r, i in enumerate(idx):
            t, m = examples[i]
            ids[r, :len(t)] = torch.tensor(t)
            mask[r, :len(m)] = torch.tensor(m) > 0
            attn[r, :len(t)] = 1
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state  # [b, T, H]
        act = mask[:, 1:]  # [b, T-1] position t predicts action token t+1; the LM head runs only there
        action_loss = loss = torch.nn.functional.cross_entropy(head(hidden[:, :-1][act]), ids[:, 1:][act])
        if copy_batch:
            loss = loss + copy_loss(model, g, batch=copy_batch, span=COPY_SPAN, token_range=copy_range)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(action_loss.detach()))
        if step % 50 == 0:
            log.info("sft step %d/%d loss %.4f", step, steps, losses[-1])
        if on_step is not None:
            on_step(step_offset + step + 1, model)
    model.eval()
    return losses


def build_warmstart(cfg: Config, out_dir: str | Path, *, steps: int = SFT_STEPS, expert_steps: int = EXPERT_STEPS,
                    threads: int = 1, on_step=None) -> Path:
    """Data -> tokenizer -> model -> expert stage -> imperfect SFT -> ``save_pretrained`` into ``out_dir``."""

    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(threads)  # results are reproducible for a fixed thread count
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data)
    corpus = load_corpus(data.corpus)
    train = load_questions(data.train)  # one- and two-hop, so one checkpoint serves both tasks
    rng = random.Random(cfg.run.seed)
    train = [q for q in train if int(q.get("hops") or 1) == 1 or rng.random() < TWO_HOP_FRACTION * 5 / 2]
    index = BM25Index.load(data.index_dir)
    sys_prompt = cfg.env.system_prompt or DEFAULT_SYSTEM_PROMPT

    titles = corpus.column("title").to_pylist()
    texts = corpus.column("text").to_pylist() + [q["question"] for q in train[:5000]]
    # The protocol text is as frequent in the tokenizer's training text as in rollouts, so BPE
    # learns whole-word tokens for "search", "name", "args", ... (seen once, they are spelled
    # letter by letter and a search action is twice as long).
    texts += [sys_prompt, THINK_SEARCH, THINK_ANSWER] * 1000
    texts += [f"<tool>{tool_call(t)}</tool>" for t in titles[::2]]
    train_demo_tokenizer(texts, VOCAB_SIZE, out)
    tok = load_tokenizer(out)
    names, env_factory = _names_and_envs(cfg, corpus, index)
    domains = _domains(train)
    model = build_demo_model(len(tok), seed=cfg.run.seed)
    log.info("demo policy: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    common = dict(batch=SFT_BATCH, pad_id=tok.pad_token_id, copy_batch=COPY_BATCH,
                  copy_range=(len(SPECIAL_TOKENS), tok.vocab_size), on_step=on_step)
    expert = demonstrations(train, env_factory, tok, cfg.run.seed, domains, names, p_right=1.0, p_partial=0.0,
                            p_garbled=0.0)
    log.info("stage 1: %d expert demonstrations + copy task, %d steps", len(expert), expert_steps)
    expert_losses = sft(model, expert, steps=expert_steps, lr=SFT_LR, seed=cfg.run.seed, **common)
    del expert
    demos = demonstrations(train, env_factory, tok, cfg.run.seed + 1, domains, names)
    log.info("stage 2: %d imperfect demonstrations (max length %d tokens), %d steps", len(demos),
             max(len(d[0]) for d in demos), steps)
    losses = sft(model, demos, steps=steps, lr=SFT_LR_IMPERFECT, seed=cfg.run.seed + 1, step_offset=expert_steps,
                 **common)
    model.save_pretrained(out, safe_serialization=True)
    meta: dict[str, Any] = {"expert_steps": expert_steps, "steps": steps,
                            "expert_final_loss": sum(expert_losses[-50:]) / max(1, len(expert_losses[-50:])),
                            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                            "seconds": time.time() - t0, "p_right_query": P_RIGHT_QUERY,
                            "p_partial_query": P_PARTIAL_QUERY, "p_garbled_answer": P_GARBLED_ANSWER,
                            "vocab_size": len(tok), "seed": cfg.run.seed}
    (out / "warmstart.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("warm start written to %s in %.0f s", out, meta["seconds"])
    return out


def build_multihop_warmstart(cfg: Config, out_dir: str | Path, *, base_dir: str | Path | None = None,
                             steps: int = MULTI_HOP_STEPS, share: float = MULTI_HOP_SHARE, threads: int = 1) -> Path:
    """Stage 3 (module constants): ``base_dir`` (default ``model.path``, the shipped warm start) -> a short SFT on
    expert two-hop demonstrations beside imperfect one-hop ones -> ``save_pretrained`` into ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(threads)
    t0 = time.time()
    base = Path(base_dir or cfg.model.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data)
    train = load_questions(data.train)
    names, env_factory = _names_and_envs(cfg, load_corpus(data.corpus), BM25Index.load(data.index_dir))
    tok = load_tokenizer(base)
    domains = _domains(train)
    rng = random.Random(cfg.run.seed + 5)
    one = [q for q in train if int(q.get("hops") or 1) == 1]
    two = [q for q in train if int(q.get("hops") or 1) == 2]
    two = rng.sample(two, min(len(two), int(len(one) * share / (1 - share))))
    demos = (demonstrations(two, env_factory, tok, cfg.run.seed + 11, domains, names, p_right=1.0, p_partial=0.0,
                            p_garbled=0.0)
             + demonstrations(one, env_factory, tok, cfg.run.seed + 12, domains, names))
    log.info("stage 3: %d expert two-hop + %d imperfect one-hop demonstrations, %d steps", len(two), len(one), steps)
    model = AutoModelForCausalLM.from_pretrained(base)
    losses = sft(model, demos, steps=steps, batch=SFT_BATCH, lr=SFT_LR_IMPERFECT, seed=cfg.run.seed + 3,
                 pad_id=tok.pad_token_id, copy_batch=COPY_BATCH, copy_range=(len(SPECIAL_TOKENS), tok.vocab_size))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {"base": str(base), "steps": steps, "two_hop_share": share, "lr": SFT_LR_IMPERFECT,
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "seconds": time.time() - t0,
            "seed": cfg.run.seed}
    (out / "warmstart.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("multi-hop warm start written to %s in %.0f s", out, meta["seconds"])
    return out
