"""The env worker's side of the judge: render, cache, batch, dispatch, time out, count.

An :class:`env_workers.worker.EnvWorker` holds one :class:`JudgeClient` (it travels to the env
worker actor with the actor handles of the judge actors inside). Each env step gathers the
judge items of all its episodes (search turns and/or finished answers) into one
:meth:`JudgeClient.score` call:

1. every item is rendered into its prompt (:func:`env_workers.judge.render`); a prompt seen
   before is answered from an LRU cache keyed by the hash of (kind, prompt text), and a prompt
   that occurs twice in one call (a group's identical searches) is scored once;
2. the rest are split into batches of ``batch_size`` and spread over the judge actors
   (round robin), all in flight at once;
3. a batch whose judge actor died or is restarting is sent again (counted in ``retries``) while
   ``timeout_s`` lasts; batches that still have no answer by then, or whose judge raised an
   error, score 0 and are counted in ``failures``. The step never fails.

:meth:`JudgeClient.stats` holds the running counts that the trainer turns into the step's
``judge/*`` metrics and ``perf/time/judge_s``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from env_workers.judge import KINDS, OUTCOME_FIELDS, TEMPLATES, TURN_FIELDS, check_template, render

log = logging.getLogger(__name__)


class JudgeClient:
    """Scores judge items through judge actors (Ray handles) or any objects with ``score(prompts)``."""

    def __init__(self, judges: Sequence[Any], *, turn_weight: float = 0.0, outcome_weight: float = 0.0,
                 batch_size: int = 32, timeout_s: float = 30.0, cache_size: int = 100_000,
                 turn_template: str | None = None, outcome_template: str | None = None,
                 max_field_chars: int = 2000) -> None:
        if not judges:
            raise ValueError("JudgeClient needs at least one judge")
        if turn_weight < 0 or outcome_weight < 0 or turn_weight + outcome_weight <= 0:
            raise ValueError(f"judge weights turn={turn_weight}, outcome={outcome_weight}: both >= 0, one > 0")
        if batch_size < 1 or timeout_s <= 0 or cache_size < 0 or max_field_chars < 1:
            raise ValueError("judge: batch_size >= 1, timeout_s > 0, cache_size >= 0, max_field_chars >= 1")
        self.templates = {**TEMPLATES, **{k: t for k, t in (("turn", turn_template), ("outcome", outcome_template)) if t}}
        check_template(self.templates["turn"], TURN_FIELDS, "judge.turn_template")
        check_template(self.templates["outcome"], OUTCOME_FIELDS, "judge.outcome_template")
        self.judges = list(judges)
        self.weights = {"turn": float(turn_weight), "outcome": float(outcome_weight)}
        self.batch_size, self.timeout_s, self.max_field_chars = batch_size, float(timeout_s), max_field_chars
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._next = 0  # round-robin position over the judges
        self.counts = {"requests": 0, "cache_hits": 0, "scored": 0, "failures": 0, "retries": 0, "calls": 0,
                       "wait_s": 0.0,
                       "model_s": 0.0, **{f"{k}_items": 0 for k in KINDS}, **{f"{k}_score_sum": 0.0 for k in KINDS}}

    def weight(self, kind: str) -> float:
        """The rubric weight of this kind of judge score (0: not judged)."""
        return self.weights[kind]

    def prompt(self, kind: str, fields: Mapping[str, object]) -> str:
        """The judge prompt of one item."""
        return render(self.templates[kind], fields, self.max_field_chars)

    def score(self, items: Sequence[tuple[str, Mapping[str, object]]]) -> list[float]:
        """One score in [0, 1] per ``(kind, fields)`` item, kind ``turn`` or ``outcome``. Never raises on a
        judge's failure or timeout: those items score 0 (and are not cached)."""
        t0 = time.perf_counter()
        prompts = [self.prompt(kind, fields) for kind, fields in items]
        keys = [hashlib.blake2b(f"{kind}\0{p}".encode(), digest_size=16).digest()
                for (kind, _), p in zip(items, prompts)]
        scores: list[float | None] = [self._cached(k) for k in keys]
        todo: dict[bytes, list[int]] = {}
        for i, (k, s) in enumerate(zip(keys, scores)):
            if s is None:
                todo.setdefault(k, []).append(i)  # a prompt asked twice in one call is scored once
        unique = list(todo)
        got = self._dispatch([prompts[todo[k][0]] for k in unique]) if unique else []
        for k, s in zip(unique, got):
            for i in todo[k]:
                scores[i] = 0.0 if s is None else s
            if s is not None and self.cache_size:
                self._cache[k] = s
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        c = self.counts
        c["requests"] += len(items)
        c["cache_hits"] += len(items) - len(todo)  # from the cache, or the same prompt earlier in this call
        c["wait_s"] += time.perf_counter() - t0
        out = [float(s or 0.0) for s in scores]
        for (kind, _), s in zip(items, out):
            c[f"{kind}_items"] += 1
            c[f"{kind}_score_sum"] += s
        return out

    def stats(self) -> dict[str, float]:
        """Running counts since this client was built (the trainer takes differences per step)."""
        return dict(self.counts)

    # ------------------------------------------------------------------ internals

    def _cached(self, key: bytes) -> float | None:
        s = self._cache.get(key)
        if s is not None:
            self._cache.move_to_end(key)
        return s

    def _dispatch(self, prompts: list[str]) -> list[float | None]:
        """Score ``prompts`` in batches over the judges, all at once; ``None`` for a failed or late batch.

        A batch whose judge actor died or is restarting is sent again (to the next judge, after a short pause)
        while the call's ``timeout_s`` lasts, so a killed judge costs time, not scores; an error raised by the
        judge's own code is not retried."""
        batches = [prompts[i:i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        results: list[list[float] | None] = [None] * len(batches)
        pending: dict[Any, int] = {}
        for b, batch in enumerate(batches):
            try:
                ref, reply = self._submit(batch)
                if ref is not None:  # a Ray actor handle: collected below, under the timeout
                    pending[ref] = b
                else:
                    results[b] = self._checked(reply, len(batch))
            except Exception:  # noqa: BLE001 - a judge failure scores 0, never fails the step
                log.exception("judge call failed on %d prompts; scoring them 0", len(batch))
        if pending:
            self._collect(pending, batches, results, time.monotonic() + self.timeout_s)
        out: list[float | None] = []
        for batch, res in zip(batches, results):
            if res is None:
                self.counts["failures"] += len(batch)
                out.extend([None] * len(batch))
            else:
                self.counts["scored"] += len(batch)
                out.extend(res)
        return out

    def _submit(self, batch: list[str]) -> tuple[Any, Any]:
        """Send one batch to the next judge: ``(object ref, None)`` for a Ray actor, ``(None, reply)`` for a local one."""
        judge = self.judges[self._next % len(self.judges)]
        self._next += 1
        self.counts["calls"] += 1
        fn = judge.score
        if hasattr(fn, "remote"):
            return fn.remote(batch), None
        return None, fn(batch)

    def _collect(self, pending: dict[Any, int], batches: list[list[str]], results: list, deadline: float) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                b = pending.pop(ref)
                try:
                    results[b] = self._checked(ray.get(ref), len(batches[b]))
                except (RayActorError, ActorUnavailableError):  # died or restarting: try again while time is left
                    if deadline - time.monotonic() > 0.3:
                        self.counts["retries"] += 1
                        time.sleep(0.25)
                        pending[self._submit(batches[b])[0]] = b
                    else:
                        log.warning("judge actor unavailable; %d prompts score 0", len(batches[b]))
                except Exception:  # noqa: BLE001 - an error in the judge itself
                    log.exception("judge actor failed on %d prompts; scoring them 0", len(batches[b]))
        if pending:
            log.warning("%d judge calls did not answer within %.1f s; their prompts score 0", len(pending),
                        self.timeout_s)

    def _checked(self, reply: Any, n: int) -> list[float]:
        """The scores of a judge reply, validated (a reply of the wrong shape is a failure)."""
        scores = reply["scores"] if isinstance(reply, dict) else reply
        if not isinstance(scores, (list, tuple)) or len(scores) != n:
            raise ValueError(f"judge returned {type(scores).__name__} of {len(scores) if hasattr(scores, '__len__') else '?'}"
                             f" scores for {n} prompts")
        if isinstance(reply, dict):
            self.counts["model_s"] += float(reply.get("seconds", 0.0))
        return [min(1.0, max(0.0, float(s))) if isinstance(s, (int, float)) and s == s else 0.0 for s in scores]
