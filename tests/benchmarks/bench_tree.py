"""Tree rollouts (rollout.tree) against the same number of independent episodes, end to end.

Workload: the two-turn task of ``make train`` (the shipped warm-start policy, the demo corpus
and its BM25 index in data/demo, deploy/configs/local.yaml's env and sampling), ``--questions``
questions x ``--leaves`` episodes each. Flat: every episode independent (today's groups). Tree:
the same number of leaves, the episodes forked at turn 1 (the answer turn) into ``c`` children
that share the root's search turn (its KV, its env state, its search result), for each ``c`` in
``--children``. Both run through the real :class:`actors.rollout.RolloutWorker` with a real
:class:`actors.generator.Generator` and :class:`env_workers.worker.EnvWorker` (in this process,
through ``LocalHandle``: the measurement is the rollout's compute, not Ray's transport).

Figures per method, median of ``--repeats`` alternated runs:
* leaf tokens/s: action tokens of the complete episodes delivered (every leaf's path counted in
  full, as ``G`` independent episodes would hold them) per wall second: the headline, the same
  unit for flat and tree;
* generated tokens/s: tokens actually sampled (a tree's shared turns once);
* episodes/s.

A second part times ``HFEngine.fork`` itself, copy-on-write (default: children hold the parent's
KV tensors) against cloning them (``copy_kv=True``), with the next turn of the children.

The last line is the headline ``bench_tree ratio: X`` = tree (c = the first of ``--children``) /
flat, leaf tokens/s.

    .venv/bin/python tests/benchmarks/bench_tree.py                  # ~3 min on 2 cores
    .venv/bin/python tests/benchmarks/bench_tree.py --children 2,4,8 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from actors.engine import HFEngine, Request, SamplingParams  # noqa: E402
from actors.generator import Generator  # noqa: E402
from actors.rollout import RolloutWorker  # noqa: E402
from common.config import load_config  # noqa: E402
from common.modeling import load_model, load_tokenizer  # noqa: E402
from env_workers.prepare import prepare_data  # noqa: E402
from env_workers.demo_data import load_questions  # noqa: E402
from learner.trainer import make_env_kwargs  # noqa: E402
from env_workers.worker import EnvWorker  # noqa: E402
from tests.actors.fakes import LocalHandle  # noqa: E402

WARM = REPO / "deploy" / "warmstart"


class _Sink:
    def put(self, batch) -> int:
        return batch.num_rows


def _worker(cfg, index_dir: str, gen: Generator, children: int | None) -> RolloutWorker:
    env = EnvWorker(index_dir, make_env_kwargs(cfg))
    tree = {"tree_branch_turns": (1,), "tree_children": children} if children else {}
    return RolloutWorker(str(WARM), [LocalHandle(gen)], [LocalHandle(env)], LocalHandle(_Sink()), run_id="bench",
                         max_tokens_per_turn=cfg.generation.max_tokens_per_turn,
                         max_tokens_per_episode=cfg.generation.max_tokens_per_episode, **tree)


def rollouts(args, cfg, questions) -> dict[str, list[dict]]:
    paths = prepare_data(cfg.data)
    gen = Generator(str(WARM), torch_threads=args.threads)
    methods = {"flat": None, **{f"tree c={c}": c for c in args.children}}
    workers = {name: _worker(cfg, str(paths.index_dir), gen, c) for name, c in methods.items()}
    gc = cfg.generation
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    first = 0
    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, worker in workers.items():
            params = SamplingParams(temperature=gc.temperature, max_new_tokens=gc.max_tokens_per_turn,
                                    stop=list(gc.stop), seed=1000 + rep)
            t0 = time.perf_counter()
            res = worker.run(questions, group_size=args.leaves, first_group_id=first, first_episode_id=first * 1000,
                             params=params)
            wall = time.perf_counter() - t0
            first += len(questions)
            if rep == 0:
                continue
            leaf_tokens = sum(e["action_tokens"] for e in res["episodes"])
            runs[name].append({"wall": wall, "leaf_tokens": leaf_tokens, "generated": res["action_tokens"],
                               "episodes": len(res["episodes"]), "forked": res["forked_episodes"],
                               "turns": statistics.mean(e["turns"] for e in res["episodes"])})
            print(f"  {name:10s} run {rep}: {wall:6.2f} s, leaf tokens {leaf_tokens}, generated {res['action_tokens']}, "
                  f"forked {res['forked_episodes']}", flush=True)
    return runs


def fork_costs(args) -> dict[str, float]:
    """Seconds of fork + the children's next turn, copy-on-write vs cloned KV (median of repeats)."""
    tok = load_tokenizer(str(WARM))
    eng = HFEngine(load_model(str(WARM)), tok)
    torch.set_num_threads(args.threads)
    prompt = tok.encode("Where was Karo Velmin born? " * 12, add_special_tokens=False)
    p = SamplingParams(temperature=1.0, max_new_tokens=24)
    out: dict[str, list[float]] = {"share": [], "copy": [], "fork_only_share": [], "fork_only_copy": []}
    for rep in range(args.repeats + 1):
        for mode in ("share", "copy"):
            eng.generate_turns([Request("p", prompt, p, seed=rep)])
            history = eng.history("p") + tok.encode("<result>Karo Velmin was born in Ralomek.</result>",
                                                    add_special_tokens=False)
            kids = [f"{mode}{rep}-{i}" for i in range(args.leaves)]
            t0 = time.perf_counter()
            eng.fork("p", kids, copy_kv=mode == "copy")
            t1 = time.perf_counter()
            eng.generate_turns([Request(k, history, p, seed=i) for i, k in enumerate(kids)])
            t2 = time.perf_counter()
            eng.free(kids + ["p"])
            if rep:
                out[mode].append(t2 - t0)
                out[f"fork_only_{mode}"].append(t1 - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--leaves", type=int, default=8, help="episodes (leaves) per question")
    ap.add_argument("--children", default="4,2", help="children per fork, comma-separated (the first is the headline)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.children = [int(c) for c in args.children.split(",")]
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # LocalHandle results go through ray.put
    cfg = load_config(REPO / "deploy/configs/local.yaml", [f"data.dir={REPO / 'data/demo'}"])
    questions = load_questions(prepare_data(cfg.data).train, limit=args.questions)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.questions} questions x {args.leaves} leaves, "
          f"{args.repeats} alternated runs each (median), torch threads {args.threads}")
    runs = rollouts(args, cfg, questions)
    base = None
    print(f"\n{'method':12s} {'leaf tok/s':>11s} {'generated tok/s':>16s} {'episodes/s':>11s} {'forked':>7s} "
          f"{'turns':>6s} {'vs flat':>8s}")
    ratios = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        leaf = statistics.median(r["leaf_tokens"] / r["wall"] for r in rs)
        gen = statistics.median(r["generated"] / r["wall"] for r in rs)
        eps = statistics.median(r["episodes"] / r["wall"] for r in rs)
        base = base or leaf
        ratios[name] = leaf / base
        print(f"{name:12s} {leaf:11.1f} {gen:16.1f} {eps:11.2f} {statistics.mean(r['forked'] for r in rs):7.1f} "
              f"{statistics.mean(r['turns'] for r in rs):6.2f} {leaf / base:8.2f}  (median wall {wall:.2f} s)")
    costs = fork_costs(args)
    print(f"\nfork into {args.leaves} children + their next turn: copy-on-write {costs['share'] * 1e3:.1f} ms, "
          f"cloned KV {costs['copy'] * 1e3:.1f} ms (fork alone {costs['fork_only_share'] * 1e3:.3f} vs "
          f"{costs['fork_only_copy'] * 1e3:.3f} ms)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"bench_tree ratio: {ratios[f'tree c={args.children[0]}']:.2f}")


if __name__ == "__main__":
    main()
