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

log = logging.getLogger(__name__)

# How the demonstrator behaves (the imperfections RL has to fix).
P_RIGHT_QUERY = 0.3  # fraction of searches that use the exact entity name
P_PARTIAL_QUERY = 0.2  # searches that use only the first or last name part (ambiguous)
P_GARBLED_ANSWER = 0.1  # answers replaced by a random value of the right kind
SFT_STEPS = 600
TWO_HOP_FRACTION = 0.15  # share of two-hop demonstrations (for the multi-hop task)
SFT_BATCH = 32
SFT_LR = 3e-3
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


def _demo_query(rng: random.Random, target: str, names: list[str]) -> str:
    u = rng.random()
    if u < P_RIGHT_QUERY:
        return target
    if u < P_RIGHT_QUERY + P_PARTIAL_QUERY and " " in target:
        return rng.choice(target.split(" "))
    return rng.choice(names)


def _read_attribute(result: str, attribute: str) -> str | None:
    m = re.search(_EXTRACT[attribute], result)
    return m.group(1) if m else None


def demonstrations(questions: list[dict], env_factory, tokenizer, seed: int, domains: dict[str, list[str]],
                   names: dict[str, list[str]]) -> list[tuple[list[int], list[float]]]:
    """Play scripted imperfect episodes through the env; return (token ids, loss mask) pairs."""
    from common.modeling import observation_glue

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
            pool = names["person"] if hop == 0 else names["city"]
            action = f"{THINK_SEARCH}<tool>{tool_call(_demo_query(rng, target, pool))}</tool>"
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
            if value is None or rng.random() < P_GARBLED_ANSWER:
                value = rng.choice(domains[q["attribute"]])
            action = f"{THINK_ANSWER}<answer>{value}</answer>"
            a_ids = tokenizer.encode(action, add_special_tokens=False)
            ids += a_ids
            mask += [1.0] * len(a_ids)
        out.append((ids, mask))
    return out


def _domains(train: list[dict]) -> dict[str, list[str]]:
    dom: dict[str, set[str]] = {}
    for q in train:
        dom.setdefault(q["attribute"], set()).add(q["answers"][0])
    return {k: sorted(v) for k, v in dom.items()}


def sft(model, examples: list[tuple[list[int], list[float]]], *, steps: int, batch: int, lr: float, seed: int,
        pad_id: int) -> list[float]:
    """Masked next-token SFT (loss on demonstration actions only); returns the loss curve.

    Batches are drawn from length buckets (short one-hop vs long two-hop conversations) so
    little compute goes to padding, and the LM head runs only where an action token is predicted.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
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
        sel = mask[:, 1:]  # [b, T-1] position t predicts action token t+1
        logits = head(hidden[:, :-1][sel])  # [N, V]
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log.info("sft step %d/%d loss %.4f", step, steps, losses[-1])
    model.eval()
    return losses


def build_warmstart(cfg: Config, out_dir: str | Path, *, steps: int = SFT_STEPS, threads: int = 1) -> Path:
    """Data -> tokenizer -> model -> SFT -> ``save_pretrained`` into ``out_dir``."""
    from common.modeling import build_demo_model, load_tokenizer, train_demo_tokenizer
    from env_workers.corpus import load_corpus
    from env_workers.demo_data import load_questions
    from env_workers.env import DEFAULT_SYSTEM_PROMPT, WikiSearchEnv
    from env_workers.index import BM25Index
    from env_workers.prepare import prepare_data

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

    texts = corpus.column("text").to_pylist() + [q["question"] for q in train[:5000]]
    texts += [sys_prompt, THINK_SEARCH, THINK_ANSWER, tool_call("Karo Velmin")]
    # NOTE: the protocol text appears once here, so BPE spells "search", "name", ... letter by
    # letter; weighting it (as frequent as in rollouts) would halve action length (open issue).
    train_demo_tokenizer(texts, VOCAB_SIZE, out)
    tok = load_tokenizer(out)
    titles = corpus.column("title").to_pylist()
    ids = corpus.column("id").to_pylist()
    names = {"person": [t for t, i in zip(titles, ids) if i.startswith("person")],
             "city": [t for t, i in zip(titles, ids) if i.startswith("city")]}
    env_factory = lambda: WikiSearchEnv(index, system_prompt=sys_prompt, max_turns=3, top_k=cfg.env.top_k,  # noqa: E731
                                        max_result_chars=cfg.env.max_result_chars)
    demos = demonstrations(train, env_factory, tok, cfg.run.seed, _domains(train), names)
    log.info("built %d demonstrations (max length %d tokens)", len(demos), max(len(d[0]) for d in demos))
    model = build_demo_model(len(tok), seed=cfg.run.seed)
    log.info("demo policy: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    losses = sft(model, demos, steps=steps, batch=SFT_BATCH, lr=SFT_LR, seed=cfg.run.seed, pad_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    meta: dict[str, Any] = {"steps": steps, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                            "seconds": time.time() - t0, "p_right_query": P_RIGHT_QUERY,
                            "p_partial_query": P_PARTIAL_QUERY, "p_garbled_answer": P_GARBLED_ANSWER,
                            "vocab_size": len(tok), "seed": cfg.run.seed}
    (out / "warmstart.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("warm start written to %s in %.0f s", out, meta["seconds"])
    return out
