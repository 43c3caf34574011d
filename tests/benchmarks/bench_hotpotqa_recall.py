"""Benchmark: recall@1 / recall@5 of HotpotQA supporting paragraphs with the BM25 index.

Data: the first 100 HotpotQA dev questions (distractor setting) with their ~10 real Wikipedia
paragraphs each (``/work/shared/data/hotpotqa_dev_distractor_100.json``); HotpotQA: Yang et al.,
"HotpotQA: A Dataset for Diverse, Explainable Multi-hop Question Answering", EMNLP 2018,
CC BY-SA 4.0.

The paragraphs of all 100 questions are pooled into one corpus (``turnrl`` ingestion,
``hotpotqa`` layout, ~1,000 passages), indexed with BM25, and each question text is searched
once. recall@k = fraction of a question's supporting titles (two per question) among the
titles of its top-k hits, averaged over questions; "both@k" = fraction of questions with all
supporting paragraphs in the top k. The pooled corpus is far smaller than Wikipedia, so these
figures are an upper bound for the same queries against a full dump.

The last line is ``hotpotqa_recall ratio: X`` with X = recall@5 (reported as measured).
Run: ``python tests/benchmarks/bench_hotpotqa_recall.py [--data PATH]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def evaluate(index, questions: list[dict], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    hits = index.search([q["question"] for q in questions], k=max(ks))
    out: dict[str, float] = {}
    for k in ks:
        recall, both = 0.0, 0
        for q, h in zip(questions, hits):
            gold = set(q["chain"])
            found = gold & {x.title for x in h[:k]}
            recall += len(found) / len(gold)
            both += int(found == gold)
        out[f"recall@{k}"] = recall / len(questions)
        out[f"both@{k}"] = both / len(questions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/shared/data/hotpotqa_dev_distractor_100.json")
    args = ap.parse_args()

    from env_workers.demo_data import load_questions
    from env_workers.index import BM25Index
    from env_workers.ingest import ingest_corpus

    questions = load_questions(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        stats = ingest_corpus(args.data, Path(tmp) / "corpus.parquet")
        results = {}
        for name, stem in (("stemmed", "english"), ("unstemmed", None)):
            idx = BM25Index.build(Path(tmp) / "corpus.parquet", stemmer=stem)
            results[name] = evaluate(idx, questions)
        by_type = {}
        idx = BM25Index.build(Path(tmp) / "corpus.parquet")
        for t in ("bridge", "comparison"):
            sub = [q for q in questions if q["attribute"] == t]
            by_type[t] = (len(sub), evaluate(idx, sub))
    print(f"HotpotQA dev distractor sample: {len(questions)} questions, {stats.passages} pooled paragraphs "
          f"(Yang et al. 2018, CC BY-SA 4.0)")
    for name, r in results.items():
        print(f"{name:10s} recall@1 {r['recall@1']:.3f} (at most 0.5: one hit, two titles)  "
              f"recall@5 {r['recall@5']:.3f}  both@5 {r['both@5']:.3f}")
    for t, (n, r) in by_type.items():
        print(f"  {t:10s} ({n:3d} q) recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  both@5 {r['both@5']:.3f}")
    print(f"hotpotqa_recall ratio: {results['stemmed']['recall@5']:.3f}")


if __name__ == "__main__":
    main()
