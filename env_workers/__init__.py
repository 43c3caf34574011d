"""Wikipedia-search environment for multi-turn tool-use RL (MT-GRPO, arXiv 2505.11821).

Modules: ``corpus`` (load ``id, title, text`` tables), ``index`` (BM25 via ``bm25s``),
``protocol`` (parse tool calls / answers, format results), ``rewards`` (the paper's rubric),
``env`` (one episode: ``reset``/``step``, batched ``step_batch``), ``worker`` (many episodes
behind one index, for a Ray actor), ``demo_data`` (synthetic encyclopedia and QA pairs).
Submodules are imported on use so that ``import env_workers`` stays light.
"""
