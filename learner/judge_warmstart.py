"""The demo judge: the warm-start policy fine-tuned into a yes/no reward model, offline and deterministic.

``turnrl warmstart --config deploy/configs/local.yaml --judge`` writes ``judge.model_path``
(``deploy/judge``). The judge starts from the policy's warm start (``model.path``: same tokenizer,
and it can already copy names, the skill that judging needs) and learns two questions on the
demo data, asked with the built-in templates of :mod:`env_workers.judge`:

* turn: "Does this search help answer the question?" (the search result, the question and the
  search action, *without* the gold answer). Label: the rubric's ``result_contains_answer`` of that
  search. The action comes last, right after the question: the name in the question and the name in
  the query then sit at a fixed distance, the geometry the policy already copies across.
* outcome: "Is the candidate answer correct?" (question, reference answer, candidate). Label: the
  rubric's exact match.

Searches and answers are played through the real environment (BM25 index, rubric) so the judge
reads exactly the observation text that training sends it. Searches use the exact name, one part
of it, or another person's name; candidates are the gold answer, another value of the attribute, or
a near miss. The reply it learns is ``yes. Score: 1`` / ``no. Score: 0`` (:data:`REPLIES`): the
likelihood mode reads the first word's probability, the generative mode parses the score.
``judge.json`` records held-out accuracy in both modes (questions of held-out people).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from common.config import Config
from common.modeling import load_model, load_tokenizer
from env_workers.demo_data import load_questions
from env_workers.env import DEFAULT_SYSTEM_PROMPT, WikiSearchEnv
from env_workers.index import BM25Index
from env_workers.judge import REPLIES, TEMPLATES, prompt_ids, render, verdict_ids
from env_workers.prepare import prepare_data
from learner.warmstart import THINK_ANSWER, THINK_SEARCH, _domains, sft, tool_call

log = logging.getLogger(__name__)

JUDGE_STEPS = 600
JUDGE_LR = 1e-3
JUDGE_BATCH = 32
PROBE_EVERY = 100  # held-out accuracy logged every this many steps (judge.json keeps the curve)
EXAMPLES_PER_KIND = 4000
EVAL_PER_KIND = 400
P_EXACT_QUERY, P_PART_QUERY = 0.45, 0.25  # else another person's name
P_GOLD_ANSWER, P_NEAR_MISS = 0.45, 0.15  # else another value of the attribute


def _near_miss(rng: random.Random, answer: str) -> str:
    """A wrong answer close to the gold one: a digit or letter changed, or a part dropped."""
    if " " in answer:
        return answer.split(" ")[0]
    k = rng.randrange(len(answer))
    c = answer[k]
    repl = str((int(c) + 1 + rng.randrange(8)) % 10) if c.isdigit() else ("x" if c != "x" else "y")
    return answer[:k] + repl + answer[k + 1:]


def judge_examples(questions: list[dict], make_env, people: list[str], domains: dict[str, list[str]],
                   n_per_kind: int, seed: int) -> list[dict[str, Any]]:
    """``n_per_kind`` turn items and as many outcome items: ``{"kind", "fields", "label"}``, labelled by the
    rubric through the real environment."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    one_hop = [q for q in questions if int(q.get("hops") or 1) == 1]
    for _ in range(n_per_kind):
        q = rng.choice(one_hop)
        u = rng.random()
        name = q["entity"]
        query = name if u < P_EXACT_QUERY else (rng.choice(name.split(" ")) if u < P_EXACT_QUERY + P_PART_QUERY
                                                 else rng.choice(people))
        env = make_env()
        env.reset(q)
        action = f"{THINK_SEARCH}<tool>{tool_call(query)}</tool>"
        r = env.step(action)
        out.append({"kind": "turn", "label": bool(r.info.get("result_contains_answer")),
                    "fields": {"question": q["question"], "answers": q["answers"], "action": action,
                               "observation": r.observation_text or r.info.get("error") or ""}})
    for _ in range(n_per_kind):
        q = rng.choice(one_hop)
        u = rng.random()
        gold = q["answers"][0]
        resp = gold if u < P_GOLD_ANSWER else (_near_miss(rng, gold) if u < P_GOLD_ANSWER + P_NEAR_MISS
                                               else rng.choice(domains[q["attribute"]]))
        env = make_env(max_turns=1)
        env.reset(q)
        r = env.step(f"{THINK_ANSWER}<answer>{resp}</answer>")
        em = (r.outcome_reward or {}).get("exact_match", 0.0) > 0
        out.append({"kind": "outcome", "label": bool(em),
                    "fields": {"question": q["question"], "answers": q["answers"], "response": r.info.get("answer") or ""}})
    return out


def _tokenised(items: list[dict[str, Any]], tok, max_prompt_tokens: int, max_field_chars: int
               ) -> list[tuple[list[int], list[float]]]:
    """(prompt + reply + end-of-turn, loss mask on the reply) pairs."""
    out = []
    for it in items:
        p = prompt_ids(tok, render(TEMPLATES[it["kind"]], it["fields"], max_field_chars), max_prompt_tokens)
        reply = tok.encode(REPLIES[it["label"]], add_special_tokens=False) + [tok.eos_token_id]
        out.append((p + reply, [0.0] * len(p) + [1.0] * len(reply)))
    return out


def _probe_accuracy(model, tok, items: list[dict[str, Any]], max_prompt_tokens: int, max_field_chars: int
                    ) -> dict[str, float]:
    """Likelihood-mode accuracy per kind of the model being trained."""
    from env_workers.judge_model import likelihood_scores

    ids = [prompt_ids(tok, render(TEMPLATES[it["kind"]], it["fields"], max_field_chars), max_prompt_tokens) for it in items]
    scores = likelihood_scores(model, ids, *verdict_ids(tok, "yes", "no"), pad_id=tok.pad_token_id or 0)
    right: dict[str, list[bool]] = {}
    for it, s in zip(items, scores):
        right.setdefault(it["kind"], []).append((s >= 0.5) == it["label"])
    return {f"{k}_accuracy": sum(v) / len(v) for k, v in right.items()}


def evaluate_judge(judge_dir: str | Path, items: list[dict[str, Any]], *, mode: str, threads: int,
                   max_new_tokens: int = 16) -> dict[str, float]:
    """Accuracy (score >= 0.5 against the rubric's label) per kind, and mean score on positives / negatives."""
    from env_workers.judge_client import JudgeClient
    from env_workers.judge_model import JudgeActor

    kw = {"max_new_tokens": max_new_tokens} if mode == "generative" else {}
    judge = JudgeActor(str(judge_dir), mode=mode, torch_threads=threads, **kw)
    client = JudgeClient([judge], turn_weight=1.0, outcome_weight=1.0, cache_size=0)
    t0 = time.perf_counter()
    scores = client.score([(it["kind"], it["fields"]) for it in items])
    seconds = time.perf_counter() - t0
    res: dict[str, float] = {"prompts_per_s": len(items) / seconds}
    for kind in ("turn", "outcome"):
        pairs = [(s, it["label"]) for s, it in zip(scores, items) if it["kind"] == kind]
        pos = [s for s, y in pairs if y]
        neg = [s for s, y in pairs if not y]
        res[f"{kind}_accuracy"] = sum((s >= 0.5) == y for s, y in pairs) / max(1, len(pairs))
        res[f"{kind}_positive_rate"] = len(pos) / max(1, len(pairs))
        res[f"{kind}_mean_score_pos"] = sum(pos) / max(1, len(pos))
        res[f"{kind}_mean_score_neg"] = sum(neg) / max(1, len(neg))
    return res


def build_judge(cfg: Config, out_dir: str | Path, *, steps: int = JUDGE_STEPS, threads: int = 1) -> Path:
    """Warm-start policy -> judge SFT on rubric-labelled demo items -> ``save_pretrained`` + ``judge.json``."""
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(threads)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data)
    index = BM25Index.load(data.index_dir)
    train = load_questions(data.train)
    held_out = load_questions(data.eval)
    people = sorted({q["entity"] for q in train if int(q.get("hops") or 1) == 1})
    domains = _domains(train)

    def make_env(max_turns: int = 2) -> WikiSearchEnv:
        return WikiSearchEnv(index, system_prompt=cfg.env.system_prompt or DEFAULT_SYSTEM_PROMPT, max_turns=max_turns,
                             top_k=cfg.env.top_k, max_result_chars=cfg.env.max_result_chars,
                             answer_match=cfg.env.answer_match)

    j = cfg.judge
    tok = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path)
    items = judge_examples(train, make_env, people, domains, EXAMPLES_PER_KIND, cfg.run.seed)
    examples = _tokenised(items, tok, j.max_prompt_tokens, j.max_field_chars)
    log.info("judge SFT: %d items (%.0f%% positive), max %d tokens, %d steps", len(items),
             100 * sum(it["label"] for it in items) / len(items), max(len(e[0]) for e in examples), steps)
    eval_items = judge_examples(held_out, make_env, sorted({q["entity"] for q in held_out}), domains, EVAL_PER_KIND,
                                cfg.run.seed + 1)
    curve: list[dict[str, float]] = []

    def probe(step: int, m) -> None:
        if step % PROBE_EVERY == 0 or step == steps:
            curve.append({"step": step, **_probe_accuracy(m, tok, eval_items[:100] + eval_items[-100:],
                                                          j.max_prompt_tokens, j.max_field_chars)})
            log.info("judge step %d: held-out %s", step, curve[-1])

    losses = sft(model, examples, steps=steps, batch=JUDGE_BATCH, lr=JUDGE_LR, seed=cfg.run.seed,
                 pad_id=tok.pad_token_id, on_step=probe)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    train_s = time.time() - t0
    meta: dict[str, Any] = {
        "init": str(cfg.model.path), "steps": steps, "lr": JUDGE_LR, "batch": JUDGE_BATCH, "items": len(items),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "train_seconds": train_s,
        "seed": cfg.run.seed, "held_out_items": len(eval_items), "curve": curve,
        "held_out_likelihood": evaluate_judge(out, eval_items, mode="likelihood", threads=threads),
        "held_out_generative": evaluate_judge(out, eval_items[: EVAL_PER_KIND // 4] + eval_items[-EVAL_PER_KIND // 4:],
                                              mode="generative", threads=threads),
    }
    (out / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("judge written to %s in %.0f s: %s", out, time.time() - t0, meta["held_out_likelihood"])
    return out
