"""Tool-call protocol: how an assistant turn asks for a search or gives an answer.

Two wire forms, chosen by name:

``"paper"`` (default, as in Zeng et al. 2025, arXiv 2505.11821)::

    <reasoning>...</reasoning>
    <tool>{"name": "wiki_search", "args": {"query": "..."}}</tool>     or     <answer>...</answer>

    result shown as  "<result>\\n{content}\\n</result>"

``"search_r1"`` (Search-R1 style)::

    <think>...</think>
    <search>query</search>     or     <answer>...</answer>

    result shown as  "<information>\\n{content}\\n</information>"

Model output is untrusted. :func:`parse_action` never raises on it, never evaluates it (only
``json.loads``), and only scans the first :data:`MAX_SCAN_CHARS` characters so a huge output
cannot blow up time. A malformed tool call yields ``kind="tool"`` with ``error`` set; the
environment shows that error to the model and gives no tool reward.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    from env_workers.index import Hit

logger = logging.getLogger(__name__)

#: Only this many leading characters of an action are looked at.
MAX_SCAN_CHARS = 8192
#: Deepest JSON nesting accepted inside ``<tool>`` (object -> args -> query is depth 2).
MAX_JSON_DEPTH = 4
#: Tools the environment knows.
TOOL_NAMES: tuple[str, ...] = ("wiki_search",)

ActionKind = Literal["tool", "answer", "none"]


@dataclass(frozen=True)
class ProtocolSpec:
    """Tag names of one protocol."""

    name: str
    reasoning_tag: str
    tool_tag: str
    answer_tag: str
    result_tag: str
    tool_is_json: bool


PROTOCOLS: dict[str, ProtocolSpec] = {
    "paper": ProtocolSpec("paper", "reasoning", "tool", "answer", "result", tool_is_json=True),
    "search_r1": ProtocolSpec(
        "search_r1", "think", "search", "answer", "information", tool_is_json=False
    ),
}


def get_protocol(name: str) -> ProtocolSpec:
    """Return the :class:`ProtocolSpec` called ``name``; ``ValueError`` for an unknown name."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}"
        ) from None


@dataclass
class ParsedAction:
    """What one assistant turn asked for.

    ``kind`` is ``"tool"`` when a tool call was attempted (``error`` is set when it was
    malformed, in which case ``query`` is ``None``), ``"answer"`` for a final answer and
    ``"none"`` when the turn holds neither.
    """

    kind: ActionKind
    tool_name: str | None = None
    query: str | None = None
    answer: str | None = None
    error: str | None = None

    @property
    def is_valid_tool_call(self) -> bool:
        """True when this is a tool call that can be executed."""
        return self.kind == "tool" and self.error is None and self.query is not None


@dataclass(frozen=True)
class _Block:
    start: int
    content: str
    closed: bool


def find_blocks(text: str, tag: str) -> list[_Block]:
    """All ``<tag>...</tag>`` blocks in ``text``, in order.

    An opening tag with no closing tag takes the rest of the text (``closed=False``):
    generators often stop on the closing tag and drop it.
    """
    blocks: list[_Block] = []
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            return blocks
        body = start + len(open_tag)
        end = text.find(close_tag, body)
        if end < 0:
            blocks.append(_Block(start, text[body:], closed=False))
            return blocks
        blocks.append(_Block(start, text[body:end], closed=True))
        pos = end + len(close_tag)


def _has_bad_chars(s: str) -> bool:
    """True if ``s`` holds control/binary characters (ordinary whitespace aside)."""
    for ch in s:
        if ch in "\t\n\r":
            continue
        if ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cs", "Co"):
            return True
    return False


def _json_depth_exceeds(s: str, limit: int) -> bool:
    """True if brackets outside JSON strings nest deeper than ``limit`` (cheap pre-check)."""
    depth = 0
    in_string = False
    escaped = False
    for ch in s:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _short(value: object, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_query(query: object, max_query_chars: int) -> tuple[str | None, str | None]:
    """Validate a search query; returns ``(clean_query, None)`` or ``(None, error)``."""
    if not isinstance(query, str):
        return None, f"'query' must be a string, got {type(query).__name__}"
    if _has_bad_chars(query):
        return None, "query contains control or binary characters"
    clean = " ".join(query.split())
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in clean):  # letters, digits, punctuation, symbols
        return None, "query is empty"  # also when it has no visible character (e.g. only U+202E or U+200B)
    if len(clean) > max_query_chars:
        return None, f"query is too long ({len(clean)} characters, limit {max_query_chars})"
    return clean, None


_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


def _parse_json_tool_call(content: str, max_query_chars: int) -> ParsedAction:
    s = content.strip()
    fenced = _FENCE_RE.match(s)
    if fenced:
        s = fenced.group(1)
    if not s:
        return ParsedAction("tool", error="empty tool call")
    if _has_bad_chars(s):
        return ParsedAction("tool", error="tool call contains control or binary characters")
    if _json_depth_exceeds(s, MAX_JSON_DEPTH):
        return ParsedAction("tool", error=f"tool call JSON is nested too deeply (limit {MAX_JSON_DEPTH})")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        return ParsedAction("tool", error=f"invalid JSON in tool call: {exc.msg} at position {exc.pos}")
    except (ValueError, RecursionError) as exc:
        return ParsedAction("tool", error=f"invalid JSON in tool call: {type(exc).__name__}")
    if not isinstance(obj, dict):
        return ParsedAction(
            "tool", error='tool call must be a JSON object like {"name": "wiki_search", "args": {"query": "..."}}'
        )
    name = obj.get("name")
    if not isinstance(name, str) or name not in TOOL_NAMES:
        return ParsedAction(
            "tool", error=f"unknown tool {_short(name)}; available tools: {', '.join(TOOL_NAMES)}"
        )
    args = obj.get("args")
    if not isinstance(args, dict):
        return ParsedAction("tool", tool_name=name, error="'args' must be a JSON object with a 'query' string")
    if "query" not in args:
        return ParsedAction("tool", tool_name=name, error="missing 'query' in 'args'")
    query, err = _check_query(args["query"], max_query_chars)
    return ParsedAction("tool", tool_name=name, query=query, error=err)


def parse_action(
    text: str, protocol: str = "paper", *, max_query_chars: int = 512
) -> ParsedAction:
    """Parse one assistant turn.

    The first action block in the text decides the kind (a tool call before an answer is a
    tool call, and the other way round). More than one tool call in a turn is an error.
    Never raises on model output; an unknown ``protocol`` name raises ``ValueError``.

    Args:
        text: the raw assistant text of this turn (untrusted).
        protocol: ``"paper"`` or ``"search_r1"``.
        max_query_chars: longest accepted search query, in characters.
    """
    spec = get_protocol(protocol)
    if not isinstance(text, str):
        return ParsedAction("none")
    text = text[:MAX_SCAN_CHARS]
    tools = find_blocks(text, spec.tool_tag)
    answers = find_blocks(text, spec.answer_tag)
    tool_first = bool(tools) and (not answers or tools[0].start < answers[0].start)
    if tool_first:
        if len(tools) > 1:
            return ParsedAction(
                "tool", error=f"more than one tool call in one turn ({len(tools)}); make one call per turn"
            )
        if spec.tool_is_json:
            return _parse_json_tool_call(tools[0].content, max_query_chars)
        query, err = _check_query(tools[0].content, max_query_chars)
        return ParsedAction("tool", tool_name=TOOL_NAMES[0], query=query, error=err)
    if answers:
        return ParsedAction("answer", answer=answers[0].content.strip())
    return ParsedAction("none")


def format_passage(title: str, text: str, max_chars: int) -> str:
    """One passage as ``"{title}\\n{text}"``, cut to ``max_chars`` characters."""
    s = f"{title}\n{text}"
    return s[: max(0, max_chars)]


def format_result(
    passages: Sequence["Hit"] | None,
    error: str | None = None,
    protocol: str = "paper",
    max_chars: int = 400,
) -> str:
    """The observation shown to the model after a tool call.

    Each passage is ``"{title}\\n{text}"`` cut to ``max_chars`` characters; several passages
    are joined by a blank line; an error shows as ``"Error: {message}"``; no passage as
    ``"No results found."``. All of it sits inside the protocol's result tags.
    """
    tag = get_protocol(protocol).result_tag
    return f"<{tag}>\n{result_content(passages, error, max_chars)}\n</{tag}>"


def result_content(passages: Sequence["Hit"] | None, error: str | None, max_chars: int = 400) -> str:
    """The text inside the result tags (see :func:`format_result`), passed through :func:`neutralize`."""
    if error is not None:
        return neutralize(f"Error: {error}")
    if not passages:
        return "No results found."
    return neutralize("\n\n".join(format_passage(p.title, p.text, max_chars) for p in passages))


_TAGS = sorted({t for s in PROTOCOLS.values() for t in (s.reasoning_tag, s.tool_tag, s.answer_tag, s.result_tag)})
_MARKUP_RE = re.compile(r"<(?=\s*/?\s*(?:%s)\s*>)|<\||\|>" % "|".join(_TAGS), re.IGNORECASE)
_MARKUP_SUB = {"<": "&lt;", "<|": "< |", "|>": "| >"}
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except tab and newline


def neutralize(text: str) -> str:
    """Retrieved text is data, never protocol: a passage (or an error echoing model output) cannot
    close the result block, fake a tool call or an answer, or spell a chat-template control token.

    Protocol tags of every protocol (``<answer>``, ``</result>``, ``<tool>``, ...) lose their ``<``
    (-> ``&lt;answer>``), ``<|`` / ``|>`` (ChatML-style control tokens such as ``<|im_start|>``) get a
    space, and control characters other than newline and tab are dropped. Words are unchanged, so
    answer matching on the result is unaffected. The rollout worker additionally breaks up the
    policy tokenizer's own special tokens (``common.modeling.scrub_special_tokens``).
    """
    return _MARKUP_RE.sub(lambda m: _MARKUP_SUB[m.group(0)], _CONTROL_RE.sub("", text))
