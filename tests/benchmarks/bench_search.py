"""Benchmark: search throughput through the EnvWorker Ray actor vs calling bm25s directly.

One index (synthetic corpus from ``env_workers.synthetic``, ``--passages`` passages of ~100
words, built with ``BM25Index.build``) is searched with the same queries three ways in the
same run, round by round, alternating so that machine noise hits all alike (every path loads
the index files memory-mapped):

* **actor**: ``EnvWorker`` as a Ray actor holding ``--batch`` live episodes; each round is one
  ``step`` call whose actions are paper-protocol tool calls (JSON parse, batched BM25 search,
  result formatting and truncation, turn rewards, Ray round trip included);
* **direct**: ``bm25s.tokenize`` + ``bm25s.BM25.retrieve`` on the same index files, in this
  process (the numpy backend: a dense score vector and a partition over every document);
* **in-process**: ``BM25Index.search`` in this process (no Ray, no environment), to show what
  the actor path itself costs (``actor overhead`` line).

The last line is ``search ratio: X`` = actor queries/s / direct queries/s (target >= 0.9).
Run: ``python tests/benchmarks/bench_search.py [--passages 1000000] [--batch 64] [--rounds 10]`` (reuses
the corpus and index that ``bench_index_build.py`` leaves in ``--work-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_queries(corpus: Path, n: int, seed: int = 0, skip_top: int = 100) -> list[str]:
    """Title plus three words of a random passage (a typical 3-6 word search query).

    The ``skip_top`` most frequent synthetic words stand in for the stopwords of real text
    (which the tokenizer drops; here they are indexed), so queries do not use them.
    """
    import pyarrow.parquet as pq

    from env_workers.synthetic import make_vocabulary

    head = set(make_vocabulary(200_000)[:skip_top])
    t = pq.read_table(corpus)
    rng = random.Random(seed)
    rows = [rng.randrange(t.num_rows) for _ in range(n)]
    titles = t.column("title").take(rows).to_pylist()
    texts = t.column("text").take(rows).to_pylist()
    out = []
    for title, text in zip(titles, texts):
        words = [w for w in dict.fromkeys(text.split()) if w not in head]
        out.append(" ".join([title] + rng.sample(words, min(3, len(words)))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=1_000_000,
                    help="synthetic passages (the corpus and index of bench_index_build.py are reused)")
    ap.add_argument("--words", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64, help="queries per step call (episodes)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--work-dir", default="/tmp/turnrl-bench")
    args = ap.parse_args()

    import bm25s
    import numpy as np
    import ray
    import Stemmer

    from env_workers.index import BM25Index
    from env_workers.synthetic import write_synthetic_corpus
    from env_workers.worker import EnvWorker

    work = Path(args.work_dir)
    corpus = work / f"synthetic-{args.passages}x{args.words}.parquet"
    if not corpus.exists():
        write_synthetic_corpus(corpus, args.passages, words_per_passage=args.words)
    index_dir = work / f"index-{args.passages}x{args.words}"
    if not (index_dir / "turnrl_index.json").exists():
        t0 = time.perf_counter()
        BM25Index.build(corpus, out_dir=index_dir)
        print(f"built index over {args.passages} passages in {time.perf_counter() - t0:.1f}s")
    queries = make_queries(corpus, args.batch * (args.rounds + 1))
    rounds = [queries[i * args.batch:(i + 1) * args.batch] for i in range(args.rounds + 1)]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        env_kwargs = {"max_turns": 10**9, "top_k": args.k, "max_result_chars": 400}
        actor = ray.remote(EnvWorker).options(num_cpus=1).remote(str(index_dir), env_kwargs, mmap=True)
        ids = [f"e{i}" for i in range(args.batch)]
        ray.get(actor.reset.remote(ids, [{"question": "q", "answers": ["zzz"]}] * args.batch))

        def tool(q: str) -> str:
            return "<reasoning>r</reasoning><tool>" + json.dumps({"name": "wiki_search", "args": {"query": q}}) + "</tool>"

        retriever = bm25s.BM25.load(str(index_dir), mmap=True, load_corpus=False, show_progress=False)
        stemmer = Stemmer.Stemmer("english")

        def direct(qs: list[str]) -> np.ndarray:
            toks = bm25s.tokenize(qs, stopwords="english", stemmer=stemmer, return_ids=False, show_progress=False)
            docs, _ = retriever.retrieve(toks, k=args.k, show_progress=False, n_threads=0)
            return docs

        local = BM25Index.load(index_dir, mmap=True)  # the same search code, no Ray, no env

        # warm-up round (not timed): every path touches the index once
        ray.get(actor.step.remote(ids, [tool(q) for q in rounds[0]]))
        direct(rounds[0])
        local.search(rounds[0], k=args.k)
        t_actor = t_direct = t_local = 0.0
        same_top1 = 0
        for qs in rounds[1:]:
            actions = [tool(q) for q in qs]  # building the model's text is not search work
            t0 = time.perf_counter()
            results = ray.get(actor.step.remote(ids, actions))
            t1 = time.perf_counter()
            docs = direct(qs)
            t2 = time.perf_counter()
            hits = local.search(qs, k=args.k)
            t3 = time.perf_counter()
            t_actor, t_direct, t_local = t_actor + t1 - t0, t_direct + t2 - t1, t_local + t3 - t2
            assert all(r.info["tool_success"] and not r.done for r in results)
            same_top1 += sum(int(bool(h) and h[0].doc_index == int(d[0])) for h, d in zip(hits, docs))
        n = args.batch * args.rounds
        qps_actor, qps_direct, qps_local = n / t_actor, n / t_direct, n / t_local
        print(f"machine: {os.cpu_count()} CPU cores visible; index {args.passages:,} passages; "
              f"{args.rounds} rounds x {args.batch} queries, top-{args.k}")
        print(f"actor (EnvWorker via Ray, full step): {qps_actor:,.1f} queries/s | in-process "
              f"BM25Index.search: {qps_local:,.1f} queries/s | direct bm25s tokenize+retrieve: "
              f"{qps_direct:,.1f} queries/s | same top-1 as bm25s: {same_top1}/{n}")
        print(f"actor overhead: actor / in-process BM25Index.search = {qps_actor / qps_local:.3f}")
        print(f"search ratio: {qps_actor / qps_direct:.3f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
