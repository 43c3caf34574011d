"""The optional ``vllm`` backend (GPU only, ``pip install turnrl[vllm]``), behind the engine interface.

Same calls as :class:`actors.engine.HFEngine` as far as the generator actor uses them
(``generate``, ``generate_turns`` / ``submit`` / ``step``, ``update_weights``, ``free``,
``version``), with vLLM doing the serving work:

* prompts are token ids (``TokensPrompt``): nothing is re-tokenised;
* KV reuse across turns is vLLM's automatic prefix caching: every turn sends the
  episode's full history and the cached blocks of the earlier turns are hit, so
  only the new tokens are prefilled (sessions are implicit; ``free`` is a no-op);
* per-token log-probs come from ``SamplingParams(logprobs=0)``; the engine is built
  with ``logprobs_mode="processed_logprobs"`` where the installed vLLM has it, so the
  value is log softmax(z / T) of the sampled token, as in the hf backend (older
  vLLM: raw log-probs, equal only at T = 1);
* weights are loaded through vLLM's own ``model.load_weights`` inside its worker
  process, reached with ``LLM.collective_rpc`` and the worker extension below; the
  prefix cache is reset after an update (its blocks were computed by the old
  weights) unless ``keep_kv_across_versions``.

``LLM.generate`` is synchronous: an update can only arrive between calls, i.e. at a
turn boundary, and every output records the version that produced it.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from actors.engine import GenerationOutput, Request, SamplingParams, stable_seed
from actors.weights import PackedBucket

log = logging.getLogger(__name__)

EXTENSION = "actors.vllm_engine.TurnrlWorkerExtension"


def _require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("generators.backend 'vllm' needs the optional extra: pip install 'turnrl[vllm]'") from err
    if not torch.cuda.is_available():
        raise RuntimeError("generators.backend 'vllm' needs a CUDA GPU; none is visible")
    return vllm


class TurnrlWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); called through ``collective_rpc``."""

    def turnrl_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        model.load_weights(weights=[(n, t.to(device, non_blocking=True)) for n, t in named])
        torch.cuda.synchronize()
        return len(named)

    def turnrl_init_group(self, host: str, port: int, rank: int, world_size: int) -> int:
        from actors.weights import WeightGroup

        self._turnrl_group = WeightGroup(host, port, rank, world_size, backend="nccl")  # type: ignore[attr-defined]
        return rank

    def turnrl_receive(self, plans: list[PackedBucket]) -> int:
        n = 0
        for bucket in self._turnrl_group.recv(plans):  # type: ignore[attr-defined]
            n += self.turnrl_load_weights(list(bucket.tensors().items()))
        return n


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 keep_kv_across_versions: bool = False, seed: int = 0, **llm_kwargs):
        vllm = _require_vllm()
        self.tokenizer = tokenizer
        self.version = 0
        self.keep_kv_across_versions = keep_kv_across_versions
        self.eos_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enable_prefix_caching=True,
                      gpu_memory_utilization=gpu_memory_utilization, worker_extension_cls=EXTENSION,
                      logprobs_mode="processed_logprobs", **llm_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except TypeError:  # an older vLLM without logprobs_mode / worker_extension_cls
            kwargs.pop("logprobs_mode")
            kwargs.pop("worker_extension_cls")
            log.warning("this vLLM has no logprobs_mode/worker_extension_cls: raw log-probs, legacy weight loading")
            self.llm = vllm.LLM(**kwargs)
            self._legacy = True
        else:
            self._legacy = False
        self._waiting: list[Request] = []
        self._history: dict[str, list[int]] = {}
        self._counters = {"requests": 0, "prompt_tokens": 0, "weight_updates": 0}

    # -- sampling --------------------------------------------------------------------------
    def _params(self, p: SamplingParams, cap: int, seed: int | None):
        from vllm import SamplingParams as VSP

        return VSP(n=1, temperature=0.0 if p.greedy else p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
                   max_tokens=max(1, cap), seed=seed, stop=list(p.stop), include_stop_str_in_output=True,
                   stop_token_ids=sorted(self.eos_ids), logprobs=0, detokenize=bool(p.stop))

    def _run(self, prompts: list[list[int]], vparams: list) -> list[GenerationOutput]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], vparams, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
            reason = "stop" if c.finish_reason == "stop" else "length"
            result.append(GenerationOutput(ids, lps, reason, self.version))
        self._counters["requests"] += len(prompts)
        self._counters["prompt_tokens"] += sum(len(p) for p in prompts)
        return result

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[GenerationOutput]:
        caps = max_new_tokens or [params.max_new_tokens] * len(prompts)
        caps = [max(0, min(c, params.max_new_tokens)) for c in caps]
        seeds = [None if params.seed is None else stable_seed(params.seed, k) % 2**31 for k in range(len(prompts))]
        run = [k for k, c in enumerate(caps) if c > 0]
        outs = self._run([prompts[k] for k in run], [self._params(params, caps[k], seeds[k]) for k in run])
        result = [GenerationOutput([], [], "length", self.version) for _ in prompts]
        for k, o in zip(run, outs):
            result[k] = o
        return result

    # -- sessions (prefix caching) -----------------------------------------------------------
    def generate_turns(self, requests: list[Request]) -> list[GenerationOutput]:
        caps, seeds = [], []
        for r in requests:
            cap = r.params.max_new_tokens
            if r.max_new_tokens is not None:
                cap = min(cap, r.max_new_tokens)
            if r.max_total_tokens is not None:
                cap = min(cap, r.max_total_tokens - len(r.token_ids))
            caps.append(max(0, cap))
            seed = r.seed if r.seed is not None else (
                stable_seed(r.params.seed, r.session_id, len(r.token_ids)) if r.params.seed is not None else None)
            seeds.append(None if seed is None else int(seed) % 2**31)
        run = [k for k, c in enumerate(caps) if c > 0]
        outs = self._run([requests[k].token_ids for k in run],
                         [self._params(requests[k].params, caps[k], seeds[k]) for k in run])
        result = [GenerationOutput([], [], "length", self.version, session_id=r.session_id) for r in requests]
        for k, o in zip(run, outs):
            o.session_id = requests[k].session_id
            result[k] = o
        for r, o in zip(requests, result):
            o.request_id = r.request_id
        for r, o in zip(requests, result):
            self._history[r.session_id] = list(r.token_ids) + o.token_ids
        return result

    def submit(self, requests: Iterable[Request]) -> None:
        self._waiting.extend(requests)

    def has_work(self) -> bool:
        return bool(self._waiting)

    def step(self) -> list[GenerationOutput]:
        reqs, self._waiting = self._waiting, []
        return self.generate_turns(reqs)

    def history(self, session_id: str) -> list[int]:
        return list(self._history[session_id])

    def free(self, session_ids: Iterable[str]) -> None:
        for sid in session_ids:
            self._history.pop(sid, None)

    def session_stats(self) -> dict[str, int]:
        return {"sessions": len(self._history), "waiting": len(self._waiting), **self._counters}

    # -- weights ----------------------------------------------------------------------------
    def update_weights(self, states: Iterable, version: int) -> bool:
        """Load buckets through vLLM's ``load_weights``; reset the prefix cache (stale KV)."""
        for state in states:
            named = list(state.tensors().items()) if isinstance(state, PackedBucket) else list(state.items())
            if self._legacy:
                model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
                model.load_weights(weights=named)
            else:
                self.llm.collective_rpc("turnrl_load_weights", args=(named,))
        if version != self.version and not self.keep_kv_across_versions:
            self.llm.reset_prefix_cache()
        self.version = version
        self._counters["weight_updates"] += 1
        return True

    def load_state_dict(self, state, version: int) -> None:
        self.update_weights([state], version)

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> int:
        """Join the learner's NCCL group from inside vLLM's worker (tensor parallel size 1)."""
        self.llm.collective_rpc("turnrl_init_group", args=(host, port, rank, world_size))
        return rank

    def receive_weights(self, plans: list[PackedBucket], version: int) -> int:
        self.llm.collective_rpc("turnrl_receive", args=(plans,))
        if version != self.version and not self.keep_kv_across_versions:
            self.llm.reset_prefix_cache()
        self.version = version
        return version
