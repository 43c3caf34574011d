"""Wikipedia-search environment for multi-turn tool-use RL (MT-GRPO, arXiv 2505.11821).

Modules: ``corpus`` (load ``id, title, text`` tables), ``ingest`` (Wikipedia dumps in JSONL /
Parquet / DPR TSV / KILT / HotpotQA layouts -> normalised Parquet, chunking; ``turnrl index
build`` via ``cli``), ``index`` (BM25 via ``bm25s``, batched build, mmap load), ``protocol``
(parse tool calls / answers, format results), ``rewards`` (the paper's rubric), ``judge`` (LLM
judge as an extra rubric term), ``env`` (one episode: ``reset``/``step``, batched
``step_batch``), ``worker`` (many episodes behind one index, the env worker actor), ``questions`` (TriviaQA / NQ-open / HotpotQA
question files), ``demo_data`` (synthetic encyclopedia and QA pairs), ``synthetic`` (large
synthetic corpora for benchmarks), ``prepare`` (data checks before Ray starts).
Submodules are imported on use so that ``import env_workers`` stays light.
"""
