"""The ``judge:`` section: a generative reward model served by Ray actors (env_workers/judge_model.py).

Kept beside :mod:`common.config_sections` (same conventions: every field commented, ``validate``
names the field, the value and the rule). A key that does not apply to the chosen setting (any
key while ``enabled`` is false, a generative-mode key in likelihood mode, ...) must keep its
default: a changed one is rejected rather than ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.config_sections import _check_actor_resources, _fail


@dataclass
class JudgeConfig:
    enabled: bool = False  # score search turns and/or final answers with a judge model in its own Ray actors (beside the env workers)
    model_path: str = "deploy/judge"  # local Hugging Face causal-LM directory of the judge; deploy/judge is the demo judge (`turnrl warmstart --judge`)
    backend: str = "hf"  # hf (transformers, CPU or GPU) | vllm (GPU; pip install turnrl[vllm])
    mode: str = "likelihood"  # likelihood: s = p(yes) / (p(yes) + p(no)) of the verdict word after the prompt, one forward | generative: sample a short critique and parse a score from it (GRM style)
    dtype: str = "float32"  # judge parameter dtype: float32 | bfloat16 | float16
    num_actors: int = 1  # judge actors; an env step's requests are spread over them in batches
    num_cpus: float = 1.0  # Ray CPUs per judge actor
    num_gpus: float = 0.0  # Ray GPUs per judge actor
    torch_threads: int | None = None  # hf: intra-op threads per judge actor; null: num_cpus rounded down (at least 1)
    max_restarts: int = -1  # Ray restarts of a dead judge actor (-1: no limit); calls in flight when it dies score 0 (counted)
    batch_size: int = 64  # prompts per judge call
    max_batch_tokens: int = 16384  # hf likelihood: padded prompt tokens per forward (bounds activation memory)
    timeout_s: float = 60.0  # a judge call not answered within this many seconds scores 0 (judge/failures/total); the step goes on
    cache_size: int = 100000  # judge scores kept per env worker, keyed by the hash of (kind, rendered prompt); 0: no cache
    turn_weight: float = 0.5  # weight x score enters the turn reward of every search turn as component `judge` (the rubric's answer-in-result weight; set env.rewards.result_contains_answer: 0 to replace that term)
    outcome_weight: float = 0.0  # weight x score enters the outcome reward of every finished episode as component `judge`
    turn_template: str | None = None  # judge prompt for a search turn, placeholders {question} {action} {observation} {answers}; null: env_workers.judge.TURN_TEMPLATE
    outcome_template: str | None = None  # judge prompt for a final answer, placeholders {question} {answers} {response}; null: env_workers.judge.OUTCOME_TEMPLATE
    max_prompt_tokens: int = 1024  # prompt tokens the judge reads (the tail is kept: it holds the instruction)
    max_field_chars: int = 2000  # characters of each field (question, observation, answer, ...) put into a prompt
    yes_token: str = "yes"  # likelihood: the verdict word for "yes" (its first token is scored)
    no_token: str = "no"  # likelihood: the verdict word for "no"
    max_new_tokens: int = 16  # generative: tokens sampled per critique
    temperature: float = 0.0  # generative: sampling temperature (0: greedy); sampling is seeded by the prompt, so a score is reproducible
    vllm_gpu_memory_utilization: float = 0.3  # vllm: fraction of the GPU for the judge's weights and KV cache

    def validate(self, p: str) -> None:
        defaults = JudgeConfig()
        if not self.enabled:
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name != "enabled" and getattr(self, f.name) != getattr(defaults, f.name)]
            if changed:
                _fail(f"{p}.{changed[0]}", getattr(self, changed[0]), f"applies only with {p}.enabled: true")
            return
        if self.backend not in ("hf", "vllm"):
            _fail(f"{p}.backend", self.backend, "must be 'hf' or 'vllm'")
        if self.mode not in ("likelihood", "generative"):
            _fail(f"{p}.mode", self.mode, "must be 'likelihood' or 'generative'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail(f"{p}.dtype", self.dtype, "must be float32, bfloat16 or float16")
        if self.num_actors < 1:
            _fail(f"{p}.num_actors", self.num_actors, "must be >= 1")
        _check_actor_resources(p, self.num_cpus, self.num_gpus, self.max_restarts, self.torch_threads)
        for name in ("batch_size", "max_new_tokens", "max_field_chars"):
            if getattr(self, name) < 1:
                _fail(f"{p}.{name}", getattr(self, name), "must be >= 1")
        if self.max_prompt_tokens < 8:
            _fail(f"{p}.max_prompt_tokens", self.max_prompt_tokens, "must be >= 8")
        if self.max_batch_tokens < self.max_prompt_tokens:
            _fail(f"{p}.max_batch_tokens", self.max_batch_tokens, f"must be >= {p}.max_prompt_tokens "
                  f"({self.max_prompt_tokens}): one prompt must fit a forward")
        if self.timeout_s <= 0:
            _fail(f"{p}.timeout_s", self.timeout_s, "must be > 0")
        if self.cache_size < 0:
            _fail(f"{p}.cache_size", self.cache_size, "must be >= 0 (0: no cache)")
        if self.turn_weight < 0 or self.outcome_weight < 0:
            bad = "turn_weight" if self.turn_weight < 0 else "outcome_weight"
            _fail(f"{p}.{bad}", getattr(self, bad), "must be >= 0")
        if self.turn_weight == 0 and self.outcome_weight == 0:
            _fail(f"{p}.turn_weight", 0.0, f"{p}.turn_weight or {p}.outcome_weight must be > 0 when the judge is "
                  "enabled (else its scores go nowhere)")
        if self.temperature < 0:
            _fail(f"{p}.temperature", self.temperature, "must be >= 0 (0: greedy)")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            _fail(f"{p}.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, "must be in (0, 1]")
        inapplicable = {"likelihood": ("max_new_tokens", "temperature"), "generative": ("yes_token", "no_token")}
        for name in inapplicable[self.mode]:
            if getattr(self, name) != getattr(defaults, name):
                _fail(f"{p}.{name}", getattr(self, name), f"does not apply to {p}.mode {self.mode!r}")
        if (self.backend, self.mode) != ("hf", "likelihood") and self.max_batch_tokens != defaults.max_batch_tokens:
            _fail(f"{p}.max_batch_tokens", self.max_batch_tokens, f"applies only to {p}.backend 'hf' in mode 'likelihood'")
        if self.backend != "vllm" and self.vllm_gpu_memory_utilization != defaults.vllm_gpu_memory_utilization:
            _fail(f"{p}.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization,
                  f"applies only to {p}.backend 'vllm'")
        if self.backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                _fail(f"{p}.backend", self.backend, "needs the optional extra `pip install turnrl[vllm]` and a GPU")


def judge_threads(cfg: JudgeConfig) -> int:
    """Intra-op threads of one hf judge actor: ``torch_threads``, else ``num_cpus`` rounded down (at least 1)."""
    return cfg.torch_threads or max(1, int(cfg.num_cpus))
