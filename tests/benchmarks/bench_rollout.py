"""Multi-turn rollout throughput: the session engine vs. HF ``generate`` re-prefilling every turn.

Workload (identical for every method): ``questions x group`` episodes (GRPO groups: the
``group`` copies of a question share the prompt) run ``turns`` assistant turns each. A turn
samples (temperature 1) until a stop token or ``max_tokens_per_turn``; between turns a
search-result observation (a demo-corpus passage, truncated like the env does, glued
with the model's chat template) is appended. Prompts are the demo questions rendered
with the chat template and the short system prompt of deploy/configs/local.yaml; without
data/demo they are synthetic.

Models: the embedded policy (deploy/warmstart if its weights are present, else the same
Qwen2 architecture with random weights and the warm-start tokenizer) and a ~100M-parameter
Qwen2 config with random weights. The trained warm start ends its actions itself
(``</tool>``, ``</answer>``, EOS). With random weights an action never emits ``</tool>``, so
each (episode, turn) gets a length drawn once from a geometric distribution (mean ~24
tokens, like the demo policy's actions, capped at ``max_tokens_per_turn``) and every method
stops that action exactly there: the session engine through the request's token cap,
``generate`` by running the batch to the longest action of the turn (what a batch with
stop strings does) and keeping each row's first tokens. Both then produce the same
number of action tokens.

Methods (each in the same process, interleaved, best of ``--repeats``):
* ``naive``: per turn, one left-padded batch of every live episode's *full* history through
  ``model.generate`` (the whole conversation prefilled again every turn);
* ``session``: :meth:`HFEngine.generate_turns` (KV kept across turns, only new tokens
  prefilled, group prompts prefilled once, rows leave the batch when they stop);
* ``streaming``: the same engine through ``submit`` / ``step`` (an episode's next turn joins
  the running batch as soon as its action ends);
* ``modules`` (with ``--compare-modules``): ``session`` with ``lean_forward=False``, i.e. the
  transformers modules instead of :mod:`actors.lean_forward` (same tokens, bit for bit).

Action tokens/s = sampled action tokens / wall seconds, best of the repeats per method (the
least disturbed run on a shared machine); also per CPU second of this process (torch runs
single-threaded by default, so CPU time is what an idle core would take). The last line is
the headline: ``bench_rollout ratio: X`` = best engine path (session or streaming) / naive,
wall-clock, on the embedded model with the multi-turn workload.

    .venv/bin/python tests/benchmarks/bench_rollout.py            # both models (~5 min on 2 cores)
    .venv/bin/python tests/benchmarks/bench_rollout.py --quick    # embedded model only
    .venv/bin/python tests/benchmarks/bench_rollout.py --sweep 2,3,4,6,8 --repeats 2   # ratio vs turns (~15 min)
    python tests/benchmarks/bench_rollout.py --device cuda        # on a GPU (tests/gpu_checks.sh)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.engine import HFEngine, Request, SamplingParams  # noqa: E402
from common.modeling import build_demo_model, load_tokenizer, observation_glue  # noqa: E402

log = logging.getLogger("bench_rollout")
SYSTEM = "Use the wiki_search tool in <tool> tags to search Wikipedia, then answer in <answer> tags."


def load_workload(tok, questions: int, turns: int, seed: int) -> tuple[list[list[dict]], list[list[str]]]:
    """Prompt messages per question, observation texts per question and turn."""
    rnd = random.Random(seed)
    qs, passages = [], []
    demo = REPO / "data/demo"
    if (demo / "train.parquet").is_file() and (demo / "corpus.parquet").is_file():
        import pyarrow.parquet as pq

        qs = pq.read_table(demo / "train.parquet", columns=["question"]).column("question").to_pylist()
        corpus = pq.read_table(demo / "corpus.parquet", columns=["title", "text"]).to_pylist()
        passages = [f"{r['title']}: {r['text']}" for r in corpus]
    if not qs:  # synthetic fallback
        names = ["Karo Velmin", "Lovu Zibak", "Ralomek", "Zipafen", "Vononal"]
        qs = [f"Where is {rnd.choice(names)} {i} from?" for i in range(100)]
        passages = [f"{rnd.choice(names)} is a baker from {rnd.choice(names)}. Born in {1800 + i}." * 3
                    for i in range(100)]
    picked = rnd.sample(qs, questions)
    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in picked]
    obs = [[f"<result>{rnd.choice(passages)[:400]}</result>" for _ in range(turns)] for _ in picked]
    return msgs, obs


class Episodes:
    """Token histories of the episodes; observations appended through the chat template glue."""

    def __init__(self, tok, msgs, obs, group: int):
        self.tok = tok
        self.msgs = [m for m in msgs for _ in range(group)]
        self.obs = [o for o in obs for _ in range(group)]
        self.hist = []
        for m in self.msgs:
            text = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            self.hist.append(tok.encode(text, add_special_tokens=False))
        self.glue_cache: dict[tuple[int, int], list[int]] = {}

    def extend(self, i: int, turn: int, action: list[int]) -> None:
        key = (i, turn)
        if key not in self.glue_cache:  # the same glue for every method (text of the action unused)
            glue = observation_glue(self.tok, self.msgs[i], "ACTION", self.obs[i][turn], False)
            self.glue_cache[key] = self.tok.encode(glue, add_special_tokens=False)
        self.hist[i] = self.hist[i] + action + self.glue_cache[key]


@torch.no_grad()
def run_naive(model, tok, ep: Episodes, turns: int, cap: int, stops: list[int], seed: int,
              lengths: list[list[int]] | None = None) -> int:
    torch.manual_seed(seed)
    pad = tok.pad_token_id
    n = 0
    for t in range(turns):
        hist = ep.hist
        width = max(len(h) for h in hist)
        ids = torch.tensor([[pad] * (width - len(h)) + h for h in hist], device=model.device)
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(h) for h in hist])[:, None]).long()
        mask = mask.to(model.device)
        new = cap if lengths is None else max(lengths[i][t] for i in range(len(hist)))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, eos_token_id=stops if lengths is None else None, pad_token_id=pad)
        for i in range(len(hist)):
            action = out[i, width:].tolist()
            if lengths is not None:
                action = action[:lengths[i][t]]
            for k, tkn in enumerate(action):  # cut after the first stop (the rest is padding)
                if lengths is None and tkn in stops:
                    action = action[:k + 1]
                    break
            n += len(action)
            if t + 1 < turns:
                ep.extend(i, t, action)
    return n


def _cap(lengths, cap: int, i: int, t: int) -> int:
    return cap if lengths is None else lengths[i][t]


def run_session(engine: HFEngine, ep: Episodes, turns: int, cap: int, seed: int, tag: str,
                lengths: list[list[int]] | None = None) -> int:
    params = SamplingParams(temperature=1.0, max_new_tokens=cap)
    n = 0
    sids = [f"{tag}/{i}" for i in range(len(ep.hist))]
    for t in range(turns):
        outs = engine.generate_turns([Request(s, h, params, seed=seed * 1000 + i * 10 + t,
                                              max_new_tokens=_cap(lengths, cap, i, t))
                                      for i, (s, h) in enumerate(zip(sids, ep.hist))])
        for i, o in enumerate(outs):
            n += len(o.token_ids)
            if t + 1 < turns:
                ep.extend(i, t, o.token_ids)
    engine.free(sids)
    return n


def run_streaming(engine: HFEngine, ep: Episodes, turns: int, cap: int, seed: int, tag: str,
                  lengths: list[list[int]] | None = None) -> int:
    """Continuous batching across turns: an episode's next turn joins as soon as its last one ends."""
    params = SamplingParams(temperature=1.0, max_new_tokens=cap)
    sids = [f"{tag}/{i}" for i in range(len(ep.hist))]
    index = {s: i for i, s in enumerate(sids)}
    turn = [0] * len(sids)
    engine.submit([Request(s, h, params, seed=seed * 1000 + i * 10, max_new_tokens=_cap(lengths, cap, i, 0))
                   for i, (s, h) in enumerate(zip(sids, ep.hist))])
    n = 0
    while engine.has_work():
        nxt = []
        for o in engine.step():
            i = index[o.session_id]
            n += len(o.token_ids)
            if turn[i] + 1 < turns:  # the env step is instantaneous here
                ep.extend(i, turn[i], o.token_ids)
                turn[i] += 1
                nxt.append(Request(sids[i], ep.hist[i], params, seed=seed * 1000 + i * 10 + turn[i],
                                   max_new_tokens=_cap(lengths, cap, i, turn[i])))
        engine.submit(nxt)
    engine.free(sids)
    return n


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(name: str, model, tok, *, questions: int, group: int, turns: int, cap: int, repeats: int,
          fixed_lengths: bool, seed: int = 0, compare_modules: bool = False, device: str = "cpu",
          cuda_graphs: bool = False) -> dict:
    model.to(device).eval()
    msgs, obs = load_workload(tok, questions, turns, seed)
    stops = [tok.convert_tokens_to_ids("</tool>"), tok.convert_tokens_to_ids("</answer>"), tok.eos_token_id]
    stops = [s for s in stops if isinstance(s, int) and s >= 0]
    lengths = None
    if fixed_lengths:  # random weights: geometric action lengths (mean ~24), fixed per (episode, turn)
        rnd = random.Random(seed + 1)
        lengths = [[min(cap, 1 + int(rnd.expovariate(1 / 23.5))) for _ in range(turns)]
                   for _ in range(questions * group)]
    engine = HFEngine(model, tok, device=device)
    engine.eos_ids = set() if fixed_lengths else set(stops)
    modules = HFEngine(model, tok, device=device, lean_forward=False)
    modules.eos_ids = engine.eos_ids
    graphed = HFEngine(model, tok, device=device, cuda_graphs=True) if cuda_graphs else None
    if graphed is not None:
        graphed.eos_ids = engine.eos_ids
    methods = (["naive", "session", "streaming"] + (["modules"] if compare_modules else [])
               + (["graphs"] if graphed is not None else []))
    res = {m: [] for m in methods}
    run_session(engine, Episodes(tok, msgs[:1], obs[:1], 2), 2, 4, 0, "warm")  # warm-up
    run_naive(model, tok, Episodes(tok, msgs[:1], obs[:1], 2), 2, 4, stops, 0, None)
    for r in range(repeats):
        for method in methods if r % 2 == 0 else methods[::-1]:
            ep = Episodes(tok, msgs, obs, group)
            _sync()
            c0 = time.process_time()
            t0 = time.perf_counter()
            if method == "naive":
                n = run_naive(model, tok, ep, turns, cap, stops, seed + r, lengths)
            elif method == "session":
                n = run_session(engine, ep, turns, cap, seed + r, f"r{r}", lengths)
            elif method == "modules":
                n = run_session(modules, ep, turns, cap, seed + r, f"m{r}", lengths)
            elif method == "graphs":  # streaming, decode steps replayed as CUDA graphs
                n = run_streaming(graphed, ep, turns, cap, seed + r, f"g{r}", lengths)
            else:
                n = run_streaming(engine, ep, turns, cap, seed + r, f"s{r}", lengths)
            _sync()
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
            res[method].append((n / dt, n, dt, n / cpu))
            log.info("%s %-9s repeat %d: %d action tokens in %.2f s = %.1f tok/s (CPU %.2f s = %.1f tok/s)",
                     name, method, r, n, dt, n / dt, cpu, n / cpu)
    best = {m: max(v[0] for v in res[m]) for m in res}
    best_cpu = {m: max(v[3] for v in res[m]) for m in res}
    engines = [m for m in ("session", "streaming", "graphs") if m in res]
    ratios = [max(x[0] for x in xs[1:]) / xs[0][0] for xs in zip(res["naive"], *(res[m] for m in engines))]
    params = sum(p.numel() for p in model.parameters())
    ep = Episodes(tok, msgs, obs, group)
    out = {
        "name": name, "device": device, "params": params, "episodes": questions * group, "questions": questions, "group": group,
        "turns": turns, "max_tokens_per_turn": cap, "prompt_tokens_mean": statistics.mean(len(h) for h in ep.hist),
        "naive_tok_s": round(best["naive"], 1), "session_tok_s": round(best["session"], 1),
        "streaming_tok_s": round(best["streaming"], 1),
        "ratio_session": round(best["session"] / best["naive"], 2),
        "ratio_best": round(max(best[m] for m in engines) / best["naive"], 2),
        "ratio_median_pairs": round(statistics.median(ratios), 2),
        "naive_cpu_tok_s": round(best_cpu["naive"], 1), "session_cpu_tok_s": round(best_cpu["session"], 1),
        "streaming_cpu_tok_s": round(best_cpu["streaming"], 1),
        "ratio_cpu": round(max(best_cpu[m] for m in engines) / best_cpu["naive"], 2),
        "engine_stats": engine.session_stats(), "lean_forward": engine.lean_forward,
    }
    if graphed is not None:
        out["graphs_tok_s"] = round(best["graphs"], 1)
        out["graphs_over_streaming"] = round(best["graphs"] / best["streaming"], 2)
        out["graph_stats"] = {k: v for k, v in graphed.session_stats().items() if k.startswith("graph_")}
        out["cuda_graphs_on"] = graphed.cuda_graphs
    if compare_modules:
        out["modules_tok_s"] = round(best["modules"], 1)
        out["lean_over_modules"] = round(best["session"] / best["modules"], 2)
        out["lean_over_modules_cpu"] = round(best_cpu["session"] / best_cpu["modules"], 2)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="embedded model only")
    ap.add_argument("--big-only", action="store_true", help="the ~100M model only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribes a shared 2-core box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both methods run on it)")
    ap.add_argument("--big-questions", type=int, default=2, help="~100M model: distinct prompts")
    ap.add_argument("--big-group", type=int, default=4, help="~100M model: episodes per prompt")
    ap.add_argument("--big-turns", type=int, default=3, help="~100M model: assistant turns")
    ap.add_argument("--big-cap", type=int, default=16, help="~100M model: max tokens per action")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run streaming with decode steps replayed as CUDA graphs (generators.cuda_graphs)")
    ap.add_argument("--sweep", default="",
                    help="comma-separated turn counts (e.g. 2,4,6): run each model at each count instead of the "
                         "default runs (same workloads otherwise); the ratio grows with the turns")
    ap.add_argument("--compare-modules", action="store_true",
                    help="also run the session engine on the transformers modules (lean_forward=False)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    warm = REPO / "deploy/warmstart"
    tok = load_tokenizer(warm)
    if (warm / "config.json").is_file():  # the trained warm start ends its actions with </tool> / </answer>
        from common.modeling import load_model

        small, small_name, small_fixed = load_model(warm), "warmstart", False
    else:
        small, small_name, small_fixed = build_demo_model(len(tok), seed=0), "warmstart-arch(random)", True
    results = []
    kw = dict(compare_modules=args.compare_modules, device=args.device, cuda_graphs=args.cuda_graphs)
    sweep = [int(t) for t in args.sweep.split(",") if t.strip()]
    if not args.big_only:
        for turns in sweep or [args.turns, 2]:
            results.append(bench(small_name, small, tok, questions=8, group=8, turns=turns, cap=48,
                                 repeats=args.repeats, fixed_lengths=small_fixed, **kw))
    if not args.quick:
        big = build_demo_model(len(tok), hidden=768, layers=12, heads=12, kv_heads=2, intermediate=3072,
                               max_positions=2048, seed=0)
        for turns in sweep or [args.big_turns]:
            results.append(bench("qwen2-100M(random)", big, tok, questions=args.big_questions, group=args.big_group,
                                 turns=turns, cap=args.big_cap, repeats=max(1, args.repeats - 1),
                                 fixed_lengths=True, **kw))
    for r in results:
        print(f"{r['name']:>24} [{r['device']}] params={r['params'] / 1e6:.1f}M episodes={r['episodes']} turns={r['turns']}: "
              f"naive {r['naive_tok_s']} tok/s, session {r['session_tok_s']} tok/s (x{r['ratio_session']}), "
              f"streaming {r['streaming_tok_s']} tok/s; best x{r['ratio_best']} (median of pairs "
              f"x{r['ratio_median_pairs']}); per CPU second: naive {r['naive_cpu_tok_s']}, session "
              f"{r['session_cpu_tok_s']}, streaming {r['streaming_cpu_tok_s']}: x{r['ratio_cpu']}"
              + (f"; lean forward / modules x{r['lean_over_modules']} (CPU x{r['lean_over_modules_cpu']})"
                 if "lean_over_modules" in r else "")
              + (f"; CUDA graphs {r['graphs_tok_s']} tok/s (x{r['graphs_over_streaming']} streaming, "
                 f"{r['graph_stats']}, on={r['cuda_graphs_on']})" if "graphs_tok_s" in r else ""))
    print(f"bench_rollout ratio: {results[0]['ratio_best']:.2f}")


if __name__ == "__main__":
    main()
