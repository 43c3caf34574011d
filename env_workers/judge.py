"""Generative reward model hook: an LLM judge that scores a turn or an outcome in [0, 1].

The open question of the MT-GRPO paper (Zeng et al. 2025, arXiv 2505.11821) is richer reward
generation, e.g. a generative reward model (DeepSeek-GRM style: an LLM writes a judgement and
a score). Here a judge model is prompted with a template, generates a few tokens, and
:func:`parse_score` reads a number out of the text. The score enters the rubric as one more
weighted component, ``judge`` (:func:`judge_component`), on turn rewards, outcome rewards, or
both (see :class:`env_workers.worker.EnvWorker`).

* :class:`LLMJudge` is the Ray-free core. Its backend is any object with
  ``generate(prompts: list[list[int]], params, max_new_tokens: list[int] | None)`` returning,
  per prompt, token ids (a list of ints or an object with ``token_ids``, as
  :class:`actors.engine.HFEngine` and :class:`actors.generator.Generator` return) or text; a
  Ray actor handle with such a method (``backend.generate.remote``) works too.
* :class:`JudgeActor` is a thin class for ``ray.remote``: it loads a local model directory and
  serves ``score_outcomes`` / ``score_turns``.

The text being judged is model output and therefore untrusted: it only ever fills a template
slot (cut to ``max_field_chars``), it is never evaluated, and the judge's reply is only
searched for a number. Nothing here raises on model output or on a failing backend: an
unparsable or missing reply scores 0.
"""

from __future__ import annotations

import logging
import math
import re
import string
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

OUTCOME_TEMPLATE = (
    "You grade answers to trivia questions.\n"
    "Question: {question}\n"
    "Reference answer(s): {answers}\n"
    "Candidate answer (between the markers): <<<{response}>>>\n"
    "Is the candidate answer correct? Reply with one number between 0 and 1 as 'Score: <number>'.\n"
    "Score:"
)
TURN_TEMPLATE = (
    "You grade one step of a search agent answering a question.\n"
    "Question: {question}\n"
    "The agent's step (between the markers): <<<{action}>>>\n"
    "What the search returned: <<<{observation}>>>\n"
    "How much does this step help to answer the question? Reply with one number between 0 and 1 "
    "as 'Score: <number>'.\n"
    "Score:"
)
OUTCOME_FIELDS = frozenset({"question", "answers", "response"})
TURN_FIELDS = frozenset({"question", "action", "observation", "answers"})
#: Only this many leading characters of a judge reply are parsed.
MAX_REPLY_CHARS = 2000

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TAGGED_RE = re.compile(rf"<score>\s*({_NUM})\s*</score>", re.IGNORECASE)
_LABELLED_RE = re.compile(rf"\b(?:score|rating|grade)\b\s*(?:is|of|=|:)?\s*\**\s*({_NUM})\s*(%|/\s*({_NUM}))?", re.IGNORECASE)
_FIRST_RE = re.compile(rf"({_NUM})\s*(%|/\s*({_NUM}))?")
_YES_RE = re.compile(r"^\W*(yes|correct|true|right)\b", re.IGNORECASE)


def _scale(value: float, percent: bool, denominator: float | None) -> float | None:
    """Map a parsed number to [0, 1]; ``None`` if it cannot be a score."""
    if not math.isfinite(value):
        return None
    if percent:
        value /= 100.0
    elif denominator is not None:
        if not math.isfinite(denominator) or denominator <= 0:
            return None
        value /= denominator
    elif 1.0 < value <= 10.0:
        value /= 10.0  # "Score: 7" read as out of 10
    elif 10.0 < value <= 100.0:
        value /= 100.0  # "Score: 85" read as a percentage
    if value < 0.0 or value > 1.0:
        return None
    return value


def _from_match(m: re.Match[str]) -> float | None:
    try:
        value = float(m.group(1))
        suffix = m.group(2) or ""
        denominator = float(m.group(3)) if m.group(3) else None
    except (ValueError, IndexError, OverflowError):
        return None
    return _scale(value, suffix.strip() == "%", denominator)


def parse_score(text: object) -> float:
    """A score in [0, 1] read from a judge's reply; 0.0 when there is none. Never raises.

    Looked for, in order: ``<score>x</score>``; a labelled number (``Score: 0.8``,
    ``rating = 7/10``, ``grade: 85%``); the first number of the reply (the templates end with
    ``Score:`` so a reply usually starts with it); a leading yes/correct (1.0) or
    no/incorrect (0.0). ``x/y`` divides, ``x%`` is a percentage, a bare number in (1, 10] is
    read out of 10 and in (10, 100] out of 100; anything else outside [0, 1] is unparsable.
    """
    if not isinstance(text, str):
        return 0.0
    s = text[:MAX_REPLY_CHARS]
    try:
        for regex in (_TAGGED_RE, _LABELLED_RE):
            for m in regex.finditer(s):
                v = _from_match(m) if regex is _LABELLED_RE else _scale(float(m.group(1)), False, None)
                if v is not None:
                    return v
        m = _FIRST_RE.search(s)
        if m is not None:
            v = _from_match(m)
            if v is not None:
                return v
        if _YES_RE.match(s):
            return 1.0
    except (ValueError, OverflowError):  # pragma: no cover - regexes only admit numbers
        return 0.0
    return 0.0


def judge_component(score: float, weight: float) -> dict[str, float]:
    """The ``judge`` rubric component: ``{"judge": weight * score}`` (score clamped to [0, 1])."""
    s = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else 0.0
    return {"judge": float(weight) * min(1.0, max(0.0, s))}


def _check_template(template: str, allowed: frozenset[str], name: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{name}: not a valid format template ({exc})") from exc
    unknown = fields - allowed
    if unknown:
        raise ValueError(f"{name}: unknown placeholder(s) {sorted(unknown)}; allowed {sorted(allowed)}")


def _field(value: object, limit: int) -> str:
    if isinstance(value, (list, tuple)):
        value = "; ".join(v for v in value if isinstance(v, str))
    s = value if isinstance(value, str) else ""
    return s[:limit]


class LLMJudge:
    """Scores turns and outcomes with a generative judge model (Ray-free core)."""

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        *,
        outcome_template: str = OUTCOME_TEMPLATE,
        turn_template: str = TURN_TEMPLATE,
        params: Any = None,
        max_new_tokens: int = 8,
        max_prompt_tokens: int = 1024,
        max_field_chars: int = 2000,
        use_chat_template: bool = True,
    ) -> None:
        """``params``: sampling parameters for the backend (default: greedy, ``max_new_tokens``)."""
        _check_template(outcome_template, OUTCOME_FIELDS, "outcome_template")
        _check_template(turn_template, TURN_FIELDS, "turn_template")
        if max_new_tokens < 1 or max_prompt_tokens < 8 or max_field_chars < 1:
            raise ValueError("max_new_tokens >= 1, max_prompt_tokens >= 8 and max_field_chars >= 1 are required")
        if params is None:
            from actors.engine import SamplingParams

            params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, temperature=1.0)
        self.backend = backend
        self.tokenizer = tokenizer
        self.outcome_template = outcome_template
        self.turn_template = turn_template
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_field_chars = max_field_chars
        self.use_chat_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.calls = 0
        self.failures = 0

    # ------------------------------------------------------------------ prompts

    def render(self, template: str, fields: Mapping[str, object]) -> str:
        """The judge prompt text for one item (missing fields are empty)."""
        allowed = OUTCOME_FIELDS | TURN_FIELDS
        values = {k: _field(fields.get(k), self.max_field_chars) for k in allowed}
        return template.format(**values)

    def _prompt_ids(self, text: str) -> list[int]:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids[-self.max_prompt_tokens :]  # keep the tail: it holds the instruction

    def _decode(self, out: object) -> str:
        if isinstance(out, str):
            return out
        ids = getattr(out, "token_ids", out)
        if isinstance(ids, (list, tuple)) and all(isinstance(i, int) for i in ids):
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return ""

    def generate_texts(self, prompts: Sequence[str]) -> list[str]:
        """The judge's reply to each prompt (``""`` for every prompt if the backend fails)."""
        if not prompts:
            return []
        self.calls += 1
        try:
            ids = [self._prompt_ids(p) for p in prompts]
            caps = [self.max_new_tokens] * len(ids)
            gen = getattr(self.backend, "generate")
            if hasattr(gen, "remote"):  # a Ray actor handle
                import ray

                outs = ray.get(gen.remote(ids, self.params, caps))
            else:
                outs = gen(ids, self.params, caps)
            texts = [self._decode(o) for o in outs]
            if len(texts) != len(prompts):
                raise ValueError(f"backend returned {len(texts)} outputs for {len(prompts)} prompts")
            return texts
        except Exception:  # noqa: BLE001 - a judge failure must not kill the environment
            self.failures += 1
            logger.exception("judge backend failed on %d prompts; scoring them 0", len(prompts))
            return [""] * len(prompts)

    # ------------------------------------------------------------------ scoring

    def score_outcomes(self, items: Sequence[Mapping[str, object]]) -> list[float]:
        """Score final answers: items hold ``question``, ``answers`` (aliases), ``response``."""
        texts = self.generate_texts([self.render(self.outcome_template, it) for it in items])
        return [parse_score(t) for t in texts]

    def score_turns(self, items: Sequence[Mapping[str, object]]) -> list[float]:
        """Score single turns: items hold ``question``, ``action``, ``observation`` (``answers`` optional)."""
        texts = self.generate_texts([self.render(self.turn_template, it) for it in items])
        return [parse_score(t) for t in texts]


class JudgeActor:
    """A judge model in its own process: wrap with ``ray.remote(JudgeActor)``.

    Loads ``model_path`` (a local Hugging Face directory) into an
    :class:`actors.engine.HFEngine` and serves :class:`LLMJudge` scoring.
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", torch_threads: int = 1,
                 device: str | None = None, **judge_kwargs: Any) -> None:
        import torch

        from actors.engine import HFEngine
        from common.modeling import check_model_dir, load_model, load_tokenizer

        torch.set_num_threads(max(1, torch_threads))
        check_model_dir(model_path)
        tokenizer = load_tokenizer(model_path)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = HFEngine(load_model(model_path, dtype), tokenizer, device=dev)
        self.judge = LLMJudge(self.engine, tokenizer, **judge_kwargs)
        logger.info("judge model loaded from %s on %s", model_path, dev)

    def score_outcomes(self, items: list[dict[str, Any]]) -> list[float]:
        return self.judge.score_outcomes(items)

    def score_turns(self, items: list[dict[str, Any]]) -> list[float]:
        return self.judge.score_turns(items)

    def replies(self, prompts: list[str]) -> list[str]:
        """Raw judge replies (for inspecting a template)."""
        return self.judge.generate_texts(prompts)

    def ping(self) -> bool:
        return True
