"""Reward rubric of MT-GRPO (Zeng et al. 2025, arXiv 2505.11821), as pure functions.

Turn rewards (every tool turn; other turns get zeros):

* ``tool_execution``          = w_tool   * 1[this turn's tool call executed successfully]
* ``result_contains_answer``  = w_result * 1[normalised result text contains an answer alias]

Outcome rewards (on the last turn of an episode):

* ``exact_match``     = w_em       * 1[normalised answer == an alias]
* ``answer_contains`` = w_contains * 1[normalised answer contains an alias]
* ``f1``              = w_f1       * max SQuAD token F1 over aliases (weight 0 by default)
* ``format``          = w_format   * fraction of assistant turns that match the protocol's
  whole-turn format (``<reasoning>..</reasoning>`` then one ``<tool>..</tool>`` or
  ``<answer>..</answer>``)
* ``xml``             = w_xml      * mean over assistant turns of the fraction of expected tags
  (reasoning, and tool-or-answer) that are opened exactly once and closed exactly once

Every value in a returned dict is already weighted; the reward of a turn or an outcome is the
sum of its dict. Nothing here raises on model output: non-string input counts as empty text.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Sequence

from env_workers.protocol import MAX_SCAN_CHARS, PROTOCOLS, ProtocolSpec

logger = logging.getLogger(__name__)

AnswerMatch = Literal["normalized", "strict"]

#: Keys of a turn-reward dict, in a fixed order (stable Arrow columns).
TURN_REWARD_KEYS: tuple[str, ...] = ("tool_execution", "result_contains_answer")
#: Keys of an outcome-reward dict, in a fixed order.
OUTCOME_REWARD_KEYS: tuple[str, ...] = ("exact_match", "answer_contains", "f1", "format", "xml")


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the rubric; defaults are the paper's."""

    tool_execution: float = 0.2
    """Turn: the tool call executed."""
    result_contains_answer: float = 0.5
    """Turn: the search result contains the answer."""
    exact_match: float = 1.0
    """Outcome: the answer equals an alias."""
    answer_contains: float = 0.5
    """Outcome: the answer contains an alias."""
    format: float = 0.2
    """Outcome: fraction of well-formed assistant turns."""
    xml: float = 0.2
    """Outcome: mean tag-count correctness of assistant turns."""
    f1: float = 0.0
    """Outcome: SQuAD token F1 (off by default)."""

    def to_dict(self) -> dict[str, float]:
        """Plain dict of the weights."""
        return asdict(self)


# --------------------------------------------------------------------------- normalisation

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def _text(x: object) -> str:
    return x if isinstance(x, str) else ""


def normalize_answer(s: object) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    t = _text(s).lower().translate(_PUNCT_TABLE)
    t = _ARTICLES_RE.sub(" ", t)
    return " ".join(t.split())


def normalize(s: object, mode: AnswerMatch = "normalized") -> str:
    """Normalise ``s`` for matching: SQuAD-style, or ``"strict"`` (strip + lower only)."""
    if mode == "strict":
        return _text(s).strip().lower()
    return normalize_answer(s)


def _aliases(answers: object, mode: AnswerMatch) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, Iterable):
        return []
    out = [normalize(a, mode) for a in answers if isinstance(a, str)]
    return [a for a in out if a]


def _contains(haystack: str, needle: str, mode: AnswerMatch) -> bool:
    if mode == "strict":
        return needle in haystack
    # Whole-token containment: "1873" is not in "18734".
    return f" {needle} " in f" {haystack} "


def exact_match(prediction: object, answers: object, mode: AnswerMatch = "normalized") -> bool:
    """True if ``prediction`` equals any alias after normalisation."""
    if not isinstance(prediction, str):
        return False
    pred = normalize(prediction, mode)
    return bool(pred) and pred in _aliases(answers, mode)


def contains_answer(text: object, answers: object, mode: AnswerMatch = "normalized") -> bool:
    """True if normalised ``text`` contains any normalised alias (whole tokens when normalised)."""
    hay = normalize(_text(text)[: 4 * MAX_SCAN_CHARS], mode)
    if not hay:
        return False
    return any(_contains(hay, alias, mode) for alias in _aliases(answers, mode))


def token_f1(prediction: object, answers: object) -> float:
    """Best SQuAD token F1 of ``prediction`` against the aliases (0.0 if none)."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for alias in _aliases(answers, "normalized"):
        gold_tokens = alias.split()
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision = overlap / len(pred_tokens)
        recall = overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --------------------------------------------------------------------------- format rubrics

_FORMAT_RE_CACHE: dict[str, re.Pattern[str]] = {}


def _spec(protocol: str) -> ProtocolSpec:
    return PROTOCOLS.get(protocol, PROTOCOLS["paper"]) if isinstance(protocol, str) else PROTOCOLS["paper"]


def _format_re(spec: ProtocolSpec) -> re.Pattern[str]:
    pat = _FORMAT_RE_CACHE.get(spec.name)
    if pat is None:
        r, t, a = spec.reasoning_tag, spec.tool_tag, spec.answer_tag
        pat = re.compile(
            rf"^\s*<{r}>.*?</{r}>\s*(<{t}>.*?</{t}>|<{a}>.*?</{a}>)\s*$", re.DOTALL
        )
        _FORMAT_RE_CACHE[spec.name] = pat
    return pat


def turn_format_ok(turn_text: object, protocol: str = "paper") -> bool:
    """True if one assistant turn matches the protocol's whole-turn format."""
    return bool(_format_re(_spec(protocol)).match(_text(turn_text)[:MAX_SCAN_CHARS]))


def _tag_once(text: str, tag: str) -> bool:
    opens, closes = text.count(f"<{tag}>"), text.count(f"</{tag}>")
    return opens == 1 and closes == 1 and text.find(f"<{tag}>") < text.find(f"</{tag}>")


def turn_xml_score(turn_text: object, protocol: str = "paper") -> float:
    """Fraction of the expected tags (reasoning; tool-or-answer) opened and closed exactly once."""
    spec = _spec(protocol)
    text = _text(turn_text)[:MAX_SCAN_CHARS]
    reasoning = _tag_once(text, spec.reasoning_tag)
    action = _tag_once(text, spec.tool_tag) or _tag_once(text, spec.answer_tag)
    return (float(reasoning) + float(action)) / 2.0


def format_fraction(turns: Sequence[object], protocol: str = "paper") -> float:
    """Fraction of assistant turns that pass :func:`turn_format_ok` (0.0 for no turns)."""
    turns = list(turns) if isinstance(turns, (list, tuple)) else []
    if not turns:
        return 0.0
    return sum(turn_format_ok(t, protocol) for t in turns) / len(turns)


def xml_fraction(turns: Sequence[object], protocol: str = "paper") -> float:
    """Mean of :func:`turn_xml_score` over assistant turns (0.0 for no turns)."""
    turns = list(turns) if isinstance(turns, (list, tuple)) else []
    if not turns:
        return 0.0
    return sum(turn_xml_score(t, protocol) for t in turns) / len(turns)


# --------------------------------------------------------------------------- rubric

def zero_turn_reward() -> dict[str, float]:
    """Turn reward of a turn without a tool call."""
    return {k: 0.0 for k in TURN_REWARD_KEYS}


def turn_reward(
    *,
    tool_called: bool,
    tool_success: bool,
    result_text: object,
    answers: object,
    weights: RewardWeights = RewardWeights(),
    answer_match: AnswerMatch = "normalized",
) -> dict[str, float]:
    """Weighted turn-reward components of one turn.

    ``tool_execution`` needs a successful call; ``result_contains_answer`` needs a successful
    call whose result text (what the model was shown) contains an alias.
    """
    if not tool_called:
        return zero_turn_reward()
    ok = bool(tool_success)
    found = ok and contains_answer(result_text, answers, answer_match)
    return {
        "tool_execution": weights.tool_execution * float(ok),
        "result_contains_answer": weights.result_contains_answer * float(found),
    }


def outcome_reward(
    *,
    answer: object,
    answers: object,
    assistant_turns: Sequence[object],
    protocol: str = "paper",
    weights: RewardWeights = RewardWeights(),
    answer_match: AnswerMatch = "normalized",
) -> dict[str, float]:
    """Weighted outcome-reward components of a finished episode.

    ``answer`` is the parsed final answer (``None`` when there is none: the answer terms are
    then 0, the format terms still count).
    """
    has_answer = isinstance(answer, str)
    return {
        "exact_match": weights.exact_match * float(has_answer and exact_match(answer, answers, answer_match)),
        "answer_contains": weights.answer_contains
        * float(has_answer and contains_answer(answer, answers, answer_match)),
        "f1": weights.f1 * (token_f1(answer, answers) if has_answer else 0.0),
        "format": weights.format * format_fraction(assistant_turns, protocol),
        "xml": weights.xml * xml_fraction(assistant_turns, protocol),
    }


def total(components: dict[str, float]) -> float:
    """Sum of a reward-component dict."""
    return float(sum(components.values()))
