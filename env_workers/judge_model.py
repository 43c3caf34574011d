"""The judge model behind the ``judge:`` config: a causal LM that scores rendered judge prompts.

:class:`JudgeActor` is a plain class; training runs ``judge.num_actors`` of them as Ray actors
(``ray.remote(JudgeActor)``, restarted by Ray) and the env workers reach them through
:class:`env_workers.judge_client.JudgeClient`. One call, :meth:`JudgeActor.score`, takes a batch
of prompt texts (rendered by :func:`env_workers.judge.render`) and returns one score in [0, 1]
per prompt, plus the seconds the model spent on them (the judge's throughput).

Backends (``judge.backend``): ``hf`` (transformers on CPU or GPU) and ``vllm`` (a GPU; needs the
optional extra). Modes (``judge.mode``):

* ``likelihood``: one forward over each prompt; the logits at its last position give
  ``s = sigmoid(log p(yes) - log p(no))`` for the first tokens of the two verdict words
  (:func:`env_workers.judge.likelihood_score`). hf: right-padded batches, the LM head only at the
  last real position; vllm: the prompt log-prob of each verdict token appended to the prompt.
* ``generative``: sample up to ``max_new_tokens`` tokens (greedy at temperature 0, else seeded by
  the prompt, so a score is reproducible) and read a score with
  :func:`env_workers.judge.parse_score`, which treats the reply as untrusted text.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from env_workers.judge import likelihood_score, parse_score, prompt_ids, verdict_ids

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
MODES = ("likelihood", "generative")


def likelihood_scores(model: Any, ids: list[list[int]], yes_id: int, no_id: int, *, pad_id: int = 0,
                      max_batch_tokens: int = 16384, device: str = "cpu") -> list[float]:
    """Likelihood-mode scores of token-id prompts with a Hugging Face causal LM (no gradient):

        s_b = sigmoid(log p(yes | ids_b) - log p(no | ids_b))          ids: B prompts, one score each

    Batches of similar length, right-padded, at most ``max_batch_tokens`` padded tokens each:
    ``logits[b, len_b - 1]`` is the next-token distribution after prompt b (real tokens keep their
    positions; later padding cannot reach them causally), and the LM head runs only there.
    """
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    was_training = model.training
    model.eval()
    start = 0
    while start < len(order):
        stop = start + 1  # grow the batch while rows x width stays in budget (sorted: the last is widest)
        while stop < len(order) and (stop + 1 - start) * len(ids[order[stop]]) <= max_batch_tokens:
            stop += 1
        rows = order[start:stop]
        width = len(ids[rows[-1]])
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            attn[r, : len(ids[i])] = 1
        last = torch.tensor([len(ids[i]) - 1 for i in rows], device=device)
        with torch.no_grad():
            hidden = decoder(input_ids=x.to(device), attention_mask=attn.to(device)).last_hidden_state
            logp = torch.log_softmax(head(hidden[torch.arange(len(rows), device=device), last]).float(), -1)
        for r, i in enumerate(rows):
            out[i] = likelihood_score(float(logp[r, yes_id]), float(logp[r, no_id]))
        start = stop
    model.train(was_training)
    return out


class JudgeActor:
    """Loads a local model directory and scores judge prompts (wrap with ``ray.remote``)."""

    def __init__(self, model_path: str, *, backend: str = "hf", mode: str = "likelihood", dtype: str = "float32",
                 torch_threads: int = 1, device: str | None = None, yes_token: str = "yes", no_token: str = "no",
                 max_new_tokens: int = 8, temperature: float = 0.0, max_prompt_tokens: int = 1024,
                 max_batch_tokens: int = 16384, seed: int = 0, vllm_gpu_memory_utilization: float = 0.3) -> None:
        import torch

        from common.modeling import check_model_dir, load_tokenizer

        if backend not in BACKENDS:
            raise ValueError(f"judge backend {backend!r}: must be one of {BACKENDS}")
        if mode not in MODES:
            raise ValueError(f"judge mode {mode!r}: must be one of {MODES}")
        if max_new_tokens < 1 or max_prompt_tokens < 8 or max_batch_tokens < max_prompt_tokens or temperature < 0:
            raise ValueError("judge: max_new_tokens >= 1, max_prompt_tokens >= 8, max_batch_tokens >= "
                             "max_prompt_tokens and temperature >= 0 are required")
        torch.set_num_threads(max(1, torch_threads))
        check_model_dir(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.backend, self.mode = backend, mode
        self.yes_id, self.no_id = verdict_ids(self.tokenizer, yes_token, no_token)
        self.max_new_tokens, self.temperature = max_new_tokens, float(temperature)
        self.max_prompt_tokens, self.max_batch_tokens, self.seed = max_prompt_tokens, max_batch_tokens, seed
        self._exit_armed = False
        self.busy_s = 0.0  # seconds spent scoring since the actor started
        self.scored = 0
        if backend == "hf":
            from actors.engine import HFEngine
            from common.modeling import load_model

            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(model_path, dtype).to(dev).eval()
            self.device = dev
            self.engine = HFEngine(self.model, self.tokenizer, device=dev) if mode == "generative" else None
        else:
            from actors.vllm_engine import _require_vllm

            vllm = _require_vllm()
            self.llm = vllm.LLM(model=model_path, dtype=dtype, seed=seed, enable_prefix_caching=True,
                                gpu_memory_utilization=vllm_gpu_memory_utilization)
            self.device = "cuda"
        log.info("judge model %s loaded (%s, %s mode) on %s", model_path, backend, mode, self.device)

    # ------------------------------------------------------------------ serving

    def score(self, prompts: list[str]) -> dict[str, Any]:
        """``{"scores": [one float in [0, 1] per prompt], "seconds": model time of this call}``."""
        if self._exit_armed:
            log.warning("fault injection: judge actor exiting mid-call")
            os._exit(1)
        t0 = time.perf_counter()
        ids = [prompt_ids(self.tokenizer, p, self.max_prompt_tokens) for p in prompts]
        if not ids:
            scores: list[float] = []
        elif self.mode == "likelihood":
            scores = self._likelihood_hf(ids) if self.backend == "hf" else self._likelihood_vllm(ids)
        else:
            scores = [parse_score(t) for t in self._generate(ids)]
        seconds = time.perf_counter() - t0
        self.busy_s += seconds
        self.scored += len(prompts)
        return {"scores": scores, "seconds": seconds}

    def replies(self, prompts: list[str]) -> list[str]:
        """The judge's generated replies (for inspecting a template or a trained judge)."""
        return self._generate([prompt_ids(self.tokenizer, p, self.max_prompt_tokens) for p in prompts])

    def ping(self) -> bool:
        return True

    def arm_exit(self) -> None:
        """Fault injection (``faults.kill`` with actor ``judge``): the process exits inside the next
        :meth:`score` call, so an env worker is waiting on it when it dies. Ray restarts it."""
        self._exit_armed = True

    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "scored": float(self.scored)}

    # ------------------------------------------------------------------ backends

    def _likelihood_hf(self, ids: list[list[int]]) -> list[float]:
        return likelihood_scores(self.model, ids, self.yes_id, self.no_id, pad_id=self.tokenizer.pad_token_id or 0,
                                 max_batch_tokens=self.max_batch_tokens, device=self.device)

    def _likelihood_vllm(self, ids: list[list[int]]) -> list[float]:
        """vLLM: the prompt log-prob of each verdict token appended to the prompt (``prompt_logprobs=0`` returns the
        actual token's); the prefix cache serves the shared prompt of the two requests."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=p + [v]) for p in ids for v in (self.yes_id, self.no_id)]
        outs = self.llm.generate(reqs, VSP(max_tokens=1, prompt_logprobs=0), use_tqdm=False)

        def lp(o, tok: int) -> float:
            last = (o.prompt_logprobs or [None])[-1] or {}
            entry = last.get(tok)
            return float(entry.logprob) if entry is not None else float("-inf")

        return [likelihood_score(lp(outs[2 * k], self.yes_id), lp(outs[2 * k + 1], self.no_id))
                for k in range(len(ids))]

    def _generate(self, ids: list[list[int]]) -> list[str]:
        from common.hashing import stable_seed

        greedy = self.temperature == 0.0
        seed = stable_seed(self.seed, [tuple(p) for p in ids])  # the same prompts give the same critiques
        if self.backend == "vllm":
            from vllm import SamplingParams as VSP
            from vllm.inputs import TokensPrompt

            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                                     VSP(max_tokens=self.max_new_tokens, temperature=self.temperature,
                                         seed=None if greedy else seed % (2**31)), use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        from actors.engine import HFEngine, SamplingParams

        if self.engine is None:  # likelihood mode, asked for replies
            self.engine = HFEngine(self.model, self.tokenizer, device=self.device)
        params = SamplingParams(temperature=self.temperature or 1.0, greedy=greedy, max_new_tokens=self.max_new_tokens,
                                seed=seed)
        outs = self.engine.generate(ids, params)
        return [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
