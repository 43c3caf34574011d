"""A generative reward model's text side: judge prompts, and reading a score out of a reply.

The open question of the MT-GRPO paper (Zeng et al. 2025, arXiv 2505.11821) is richer reward
generation, e.g. a generative reward model (DeepSeek-GRM style: an LLM writes a judgement and
a score); the paper's v2 uses an LLM judge for turn rewards. In turnrl a judge model runs in
its own Ray actors (:class:`env_workers.judge_model.JudgeActor`); the env workers send it
batched prompts across episodes through :class:`env_workers.judge_client.JudgeClient`, and
the score enters the rubric as one more weighted component, ``judge``
(:func:`judge_component`), on search turns, on the outcome, or on both (``judge:`` config).

Two scoring modes read a prompt built here (:func:`render`, :func:`prompt_ids`):

* likelihood: one forward; ``s = p(yes) / (p(yes) + p(no))`` of the verdict word that opens
  the judge's reply (:func:`likelihood_score`);
* generative: the judge samples a short reply (a critique) and :func:`parse_score` reads a
  number out of it.

The text being judged is model output and therefore untrusted: it only ever fills a template
slot (cut to ``max_field_chars``), it is never evaluated, and the judge's reply is only
searched for a number. Nothing here raises on model output: an unparsable reply scores 0.
"""

from __future__ import annotations

import logging
import math
import re
import string
from typing import Any, Mapping

logger = logging.getLogger(__name__)

TURN_TEMPLATE = (
    "Search result: {observation}\n"
    "Question: {question}\n"
    "Search: {action}\n"
    "Does this search help answer the question? Answer yes or no."
)
OUTCOME_TEMPLATE = (
    "Question: {question}\n"
    "Reference answer: {answers}\n"
    "Candidate answer: {response}\n"
    "Is the candidate answer correct? Answer yes or no."
)
#: The built-in template of each kind of judge item.
TEMPLATES = {"turn": TURN_TEMPLATE, "outcome": OUTCOME_TEMPLATE}
OUTCOME_FIELDS = frozenset({"question", "answers", "response"})
TURN_FIELDS = frozenset({"question", "action", "observation", "answers"})
KINDS = ("turn", "outcome")
#: What the demo judge is trained to reply: the verdict word first (likelihood mode reads its
#: probability), then a score the generative mode parses.
REPLIES = {True: "yes. Score: 1", False: "no. Score: 0"}
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


def check_template(template: str, allowed: frozenset[str], name: str) -> None:
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




def render(template: str, fields: Mapping[str, object], max_field_chars: int) -> str:
    """The judge prompt text for one item: ``template`` with each field cut to ``max_field_chars``
    (missing fields are empty). Model output only ever fills a slot; it is never formatted itself."""
    values = {k: _field(fields.get(k), max_field_chars) for k in OUTCOME_FIELDS | TURN_FIELDS}
    return template.format(**values)


def prompt_ids(tokenizer: Any, text: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of a judge prompt: the text as the user's message under the tokenizer's chat template
    (when it has one) with the assistant's turn opened; the tail is kept when it is too long (it holds
    the instruction)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids[-max_prompt_tokens:]


def verdict_ids(tokenizer: Any, yes: str, no: str) -> tuple[int, int]:
    """The first token of each verdict word (likelihood mode); they must differ."""
    y = tokenizer.encode(yes, add_special_tokens=False)
    n = tokenizer.encode(no, add_special_tokens=False)
    if not y or not n or y[0] == n[0]:
        raise ValueError(f"judge verdict words {yes!r} and {no!r} must start with different tokens "
                         f"(got {y[:1]} and {n[:1]})")
    return int(y[0]), int(n[0])


def likelihood_score(logp_yes: float, logp_no: float) -> float:
    """The likelihood-mode score, the verdict probability renormalised over the two words:

        s = p(yes) / (p(yes) + p(no)) = sigmoid(log p(yes) - log p(no))

    0 when neither is finite (e.g. both missing from a backend's top log-probs)."""
    if not math.isfinite(logp_yes) and not math.isfinite(logp_no):
        return 0.0
    if not math.isfinite(logp_no):
        return 1.0
    if not math.isfinite(logp_yes):
        return 0.0
    d = logp_yes - logp_no
    return 1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0
