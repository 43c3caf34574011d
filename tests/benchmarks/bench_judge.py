"""The judge's cost: prompts per second of the demo judge, likelihood against generative mode, and what the
env workers' cache saves.

Workload: the judge prompts of one training step of ``make train`` — ``--items`` search turns of the demo
task (question + the real BM25 search result, 150 tokens each), rendered by the built-in template — scored by
the shipped demo judge (``deploy/judge``) through :class:`env_workers.judge_client.JudgeClient` and a
:class:`env_workers.judge_model.JudgeActor` in this process (the model's compute, not Ray's transport), one
thread per judge as in training.

Figures (median of ``--repeats`` alternated runs): likelihood mode (one forward per prompt, batches of
``judge.batch_size``), generative mode (``--new-tokens`` sampled tokens per critique), and likelihood mode
with every prompt already in the cache (a group's repeated searches hit it).

The last line is ``bench_judge ratio: X`` = likelihood / generative prompts per second.

    .venv/bin/python tests/benchmarks/bench_judge.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common.config import load_config  # noqa: E402
from env_workers.demo_data import load_questions  # noqa: E402
from env_workers.env import WikiSearchEnv  # noqa: E402
from env_workers.index import BM25Index  # noqa: E402
from env_workers.judge_client import JudgeClient  # noqa: E402
from env_workers.judge_model import JudgeActor  # noqa: E402
from env_workers.prepare import prepare_data  # noqa: E402
from learner.judge_warmstart import _domains, judge_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=128, help="search turns judged per measurement (one step's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16, help="generative mode: tokens per critique")
    ap.add_argument("--judge", default=str(REPO / "deploy/judge"))
    args = ap.parse_args()
    cfg = load_config(REPO / "deploy/configs/local.yaml")
    data = prepare_data(cfg.data)
    index = BM25Index.load(data.index_dir)
    train = load_questions(data.train)

    def make_env(max_turns: int = 2) -> WikiSearchEnv:
        return WikiSearchEnv(index, max_turns=max_turns, top_k=cfg.env.top_k, max_result_chars=cfg.env.max_result_chars)

    items = [it for it in judge_examples(train, make_env, sorted({q["entity"] for q in train}), _domains(train),
                                         args.items, 7) if it["kind"] == "turn"]
    batch = [(it["kind"], it["fields"]) for it in items]
    likelihood = JudgeActor(args.judge, mode="likelihood", torch_threads=1)
    generative = JudgeActor(args.judge, mode="generative", torch_threads=1, max_new_tokens=args.new_tokens)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    rates: dict[str, list[float]] = {"likelihood": [], "generative": [], "likelihood, cached": []}
    for _ in range(args.repeats):
        for name, judge in (("likelihood", likelihood), ("generative", generative)):
            client = JudgeClient([judge], turn_weight=1.0, batch_size=cfg.judge.batch_size)
            t0 = time.perf_counter()
            client.score(batch)
            rates[name].append(len(batch) / (time.perf_counter() - t0))
            if name == "likelihood":
                t0 = time.perf_counter()
                client.score(batch)  # every prompt is in the cache now
                rates["likelihood, cached"].append(len(batch) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(batch)} search-turn prompts, {args.repeats} repeats, median prompts/s:")
    for k, v in med.items():
        print(f"  {k:<20} {v:>12.1f}")
    print(f"bench_judge ratio: {med['likelihood'] / med['generative']:.2f}")


if __name__ == "__main__":
    main()
