"""Benchmark: BM25 index build rate and resident memory of a loaded index, with and without mmap.

On a synthetic corpus (``env_workers.synthetic``: Zipf-distributed pseudo-words, ~100-word
passages, >= 1M passages by default):

1. build rate of ``BM25Index.build`` (batched tokenising, streamed from Parquet into the index
   directory) over the whole corpus, in a fresh subprocess (its peak RSS is reported too);
2. same-run baseline: on the first ``--baseline-passages`` passages, ``bm25s.tokenize`` +
   ``bm25s.BM25.index`` (the library's own build) against ``BM25Index.build`` in memory, each
   in a fresh subprocess;
3. resident memory (VmRSS) of a fresh process after ``BM25Index.load(dir, mmap=False|True)``
   and after ``--queries`` searches, minus the process's RSS before loading.

The last line is ``index_build ratio: X`` = (our passages/s) / (bm25s passages/s) on the
baseline subset. Run: ``python tests/benchmarks/bench_index_build.py [--passages 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

_PRELUDE = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
def rss_mb(field="VmRSS:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_BUILD_OURS = _PRELUDE + """
from env_workers.index import BM25Index
t0 = time.perf_counter()
out = {out!r}
idx = BM25Index.build({corpus!r}, out_dir=out, batch_size=10000) if out else BM25Index.build({corpus!r}, batch_size=10000)
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "docs": len(idx), "peak_mb": peak_mb(), "anon_mb": rss_mb("RssAnon:")}}))
"""

_BUILD_BM25S = _PRELUDE + """
import bm25s, Stemmer, pyarrow.parquet as pq
t0 = time.perf_counter()
t = pq.read_table({corpus!r}, columns=["title", "text"])
texts = [f"{{a}}\\n{{b}}" for a, b in zip(t.column("title").to_pylist(), t.column("text").to_pylist())]
tokens = bm25s.tokenize(texts, stopwords="english", stemmer=Stemmer.Stemmer("english"), return_ids=False, show_progress=False)
r = bm25s.BM25(k1=1.5, b=0.75, backend="numpy")
r.index(tokens, show_progress=False)
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "docs": len(texts), "peak_mb": peak_mb()}}))
"""

_LOAD = _PRELUDE + """
import numpy, pyarrow, bm25s
from env_workers.index import BM25Index
import pyarrow.parquet as pq
titles = pq.read_table({corpus!r}, columns=["title"]).column("title").to_pylist()[:{queries}]
before, before_anon = rss_mb(), rss_mb("RssAnon:")
t0 = time.perf_counter()
idx = BM25Index.load({index!r}, mmap={mmap})
load_s = time.perf_counter() - t0
loaded = rss_mb()
t0 = time.perf_counter()
for i in range(0, len(titles), 20):
    idx.search(titles[i:i + 20], k=5)
query_s = time.perf_counter() - t0
print(json.dumps({{"before_mb": before, "loaded_mb": loaded, "after_queries_mb": rss_mb(),
                  "before_anon_mb": before_anon, "after_queries_anon_mb": rss_mb("RssAnon:"),
                  "load_s": load_s, "query_s": query_s}}))
"""


def run_child(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--baseline-passages", type=int, default=100_000)
    ap.add_argument("--words", type=int, default=100, help="mean words per passage")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work-dir", default="/tmp/turnrl-bench")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from env_workers.synthetic import write_synthetic_corpus

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"synthetic-{args.passages}x{args.words}.parquet"
    if not corpus.exists():
        t0 = time.perf_counter()
        write_synthetic_corpus(corpus, args.passages, words_per_passage=args.words)
        print(f"generated {args.passages} passages in {time.perf_counter() - t0:.1f}s -> {corpus}")
    subset = work / f"synthetic-{args.passages}x{args.words}-first{args.baseline_passages}.parquet"
    if not subset.exists():
        pf = pq.ParquetFile(corpus)
        with pq.ParquetWriter(subset, pf.schema_arrow) as w:
            left = args.baseline_passages
            for batch in pf.iter_batches(batch_size=10_000):
                if left <= 0:
                    break
                w.write_batch(batch.slice(0, left))
                left -= min(left, batch.num_rows)

    print(f"machine: {os.cpu_count()} CPU cores visible; python {sys.version.split()[0]}")
    # 2. same-run baseline on the subset (fresh processes, in-memory builds)
    ours_sub = run_child(_BUILD_OURS.format(repo=str(REPO), corpus=str(subset), out=None))
    ref_sub = run_child(_BUILD_BM25S.format(repo=str(REPO), corpus=str(subset)))
    ours_rate = ours_sub["docs"] / ours_sub["seconds"]
    ref_rate = ref_sub["docs"] / ref_sub["seconds"]
    print(f"subset {ours_sub['docs']} passages: turnrl BM25Index.build {ours_rate:,.0f} passages/s "
          f"(peak RSS {ours_sub['peak_mb']:,.0f} MB) | bm25s tokenize+index {ref_rate:,.0f} passages/s "
          f"(peak RSS {ref_sub['peak_mb']:,.0f} MB)")

    # 1. the full corpus, streamed into an index directory
    index_dir = work / f"index-{args.passages}x{args.words}"
    full = run_child(_BUILD_OURS.format(repo=str(REPO), corpus=str(corpus), out=str(index_dir)))
    size_mb = sum(f.stat().st_size for f in index_dir.iterdir() if f.is_file()) / 2**20
    print(f"full build: {full['docs']:,} passages in {full['seconds']:.1f}s = "
          f"{full['docs'] / full['seconds']:,.0f} passages/s, peak RSS {full['peak_mb']:,.0f} MB "
          f"(file-backed index pages included; anonymous at the end {full['anon_mb']:,.0f} MB), "
          f"index on disk {size_mb:,.0f} MB")

    # 3. resident memory of a loaded index, fresh process per mode
    mem = {}
    for mmap in (False, True):
        m = run_child(_LOAD.format(repo=str(REPO), corpus=str(corpus), index=str(index_dir), mmap=mmap,
                                   queries=args.queries))
        mem[mmap] = m
        print(f"load mmap={mmap}: +{m['loaded_mb'] - m['before_mb']:,.0f} MB RSS after load "
              f"({m['load_s']:.1f}s), +{m['after_queries_mb'] - m['before_mb']:,.0f} MB after "
              f"{args.queries} queries ({m['query_s']:.1f}s; anonymous +"
              f"{m['after_queries_anon_mb'] - m['before_anon_mb']:,.0f} MB)")
    plain = mem[False]["loaded_mb"] - mem[False]["before_mb"]
    mapped = max(1e-9, mem[True]["loaded_mb"] - mem[True]["before_mb"])
    print(f"index_mmap_memory ratio: {plain / mapped:.1f}")
    print(f"index_build ratio: {ours_rate / ref_rate:.2f}")


if __name__ == "__main__":
    main()
