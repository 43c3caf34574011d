"""What goes into and comes out of a decoding engine (both backends): sampling parameters,
requests of the session API, generation outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    greedy: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationOutput:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (stop string or EOS) | "length"
    version: int  # weight version that produced every token of this output
    session_id: str | None = None  # session API only
    cached_tokens: int = 0  # history tokens whose KV was reused instead of prefilled
    prefill_tokens: int = 0  # history tokens prefilled for this turn
    request_id: str | None = None  # the Request's request_id (session API only)


@dataclass
class Request:
    """One turn of one episode for the session API.

    ``token_ids`` is the *full* history of the episode (prompt, earlier actions and
    observations); the engine prefills only what the session's cache lacks.
    """

    session_id: str  # one per episode; KV of the session is kept between its turns
    token_ids: list[int]  # full token history so far (never re-tokenised text)
    params: SamplingParams  # temperature / top-p / top-k / greedy / stop / max_new_tokens
    max_new_tokens: int | None = None  # this turn's cap (also capped by params.max_new_tokens)
    max_total_tokens: int | None = None  # episode cap: len(token_ids) + new tokens <= this
    seed: int | None = None  # None: derived from params.seed and the history, or random
    request_id: str | None = None  # echoed in the output (callers match replies to requests with it)
