"""Load balancing over generator actors, with session affinity and crash recovery.

A session's KV cache lives on one generator, so every turn of an episode goes to the
generator that served its first turn (affinity). New sessions go to the least-loaded
generator, where load is the number of history tokens of the live sessions placed on it;
sessions with identical first-turn histories (the G copies of a GRPO group's prompt) are
placed together so the engine prefills the shared prompt once, unless one such block is
larger than a fair share.

When a call fails because its actor died (``RayActorError``), the pool waits for Ray to
restart it (``max_restarts``; the restarted actor reloads the latest weights from the
WeightStore before serving) and sends the same requests again: each request carries the
session's full token history, so the restarted actor re-prefills what it lost. If the
actor does not come back, its sessions move to the surviving generators.

Two ways to use it:

* ``generate_turns(requests)``: blocking, one call per generator per turn (turn-synchronous);
* ``submit(requests)`` + ``poll(g)`` / ``collect(g, ref)``: streaming. Each generator keeps
  its own queue; a poll runs its scheduler until some turn ends. The pool tracks every
  outstanding request (by ``request_id``) so a restarted generator (a failed poll, or a
  new ``instance_id``) gets them again, and stale duplicate replies are dropped.

Plain Python (no actor): the rollout worker owns one.
"""

from __future__ import annotations

import logging
from typing import Any

from actors.engine import GenerationOutput, Request
from actors.liveness import ActorGone, wait_alive

log = logging.getLogger(__name__)


class GeneratorPool:
    def __init__(self, generators: list, *, restart_wait_s: float = 120.0):
        if not generators:
            raise ValueError("GeneratorPool needs at least one generator")
        self.generators = list(generators)
        self.alive = [True] * len(self.generators)
        self.restart_wait_s = restart_wait_s
        self.owner: dict[str, int] = {}  # session id -> generator index
        self.tokens: dict[str, int] = {}  # session id -> history length (load accounting)
        self.load = [0] * len(self.generators)
        self._release: list[list[str]] = [[] for _ in self.generators]  # freed at the next call
        self._forks: list[list[tuple[str, list[str]]]] = [[] for _ in self.generators]  # forked at the next call
        self.failures = 0  # calls that hit a dead actor and were replayed
        self.outstanding: list[dict[str, Request]] = [{} for _ in self.generators]  # streaming: request_id -> req
        self.instance: list[str | None] = [None] * len(self.generators)

    # -- placement ------------------------------------------------------------------------
    def _place(self, requests: list[Request]) -> None:
        fresh: dict[tuple[int, ...], list[Request]] = {}
        for r in requests:
            if r.session_id in self.owner and self.alive[self.owner[r.session_id]]:
                self._account(r.session_id, len(r.token_ids))
            else:
                fresh.setdefault(tuple(r.token_ids), []).append(r)
        live = [g for g in range(len(self.generators)) if self.alive[g]]
        if not live:
            raise RuntimeError("no generator is alive")
        total = sum(len(b) for b in fresh.values())
        fair = max(1, -(-total // len(live)))
        blocks = []
        for block in fresh.values():
            blocks += [block[i:i + fair] for i in range(0, len(block), fair)]
        for block in sorted(blocks, key=lambda b: -len(b) * len(b[0].token_ids)):
            g = min(live, key=lambda i: (self.load[i], i))
            for r in block:
                self.owner[r.session_id] = g
                self._account(r.session_id, len(r.token_ids))

    def _account(self, sid: str, n: int) -> None:
        g = self.owner[sid]
        self.load[g] += n - self.tokens.get(sid, 0)
        self.tokens[sid] = n

    def release(self, session_ids: list[str]) -> None:
        """Episodes ended: free their caches (piggybacked on the next call to their generator)."""
        for sid in session_ids:
            g = self.owner.pop(sid, None)
            if g is None:
                continue
            self.load[g] -= self.tokens.pop(sid, 0)
            self._release[g].append(sid)

    def fork(self, parent: str, children: list[str]) -> None:
        """Tree rollouts: ``children`` continue from session ``parent`` on its generator, sharing its KV
        (piggybacked on the next call to that generator, before its turns). A parent this pool does not
        place forks nothing: the children go wherever placement puts them and prefill their histories."""
        g = self.owner.get(parent)
        if g is None or not self.alive[g]:
            return
        for sid in children:
            self.owner[sid] = g
            self._account(sid, self.tokens.get(parent, 0))
        self._forks[g].append((parent, list(children)))

    def _housekeeping(self, g: int) -> tuple[list[str], list[tuple[str, list[str]]]]:
        """The releases and forks waiting for generator ``g``'s next call (and forget them here)."""
        release, self._release[g] = self._release[g], []
        forks, self._forks[g] = self._forks[g], []
        return release, forks

    def flush_releases(self) -> None:
        """Send pending frees now (fire and forget)."""
        for g, ids in enumerate(self._release):
            if ids and self.alive[g]:
                self.generators[g].free_sessions.remote(ids)
            self._release[g] = []

    # -- generation -----------------------------------------------------------------------
    def generate_turns(self, requests: list[Request]) -> list[GenerationOutput]:
        """One turn for each request, spread by affinity/load; outputs in request order."""
        import ray
        from ray.exceptions import RayActorError

        if not requests:
            return []
        self._place(requests)
        by_gen: dict[int, list[int]] = {}
        for k, r in enumerate(requests):
            by_gen.setdefault(self.owner[r.session_id], []).append(k)
        out: list[GenerationOutput | None] = [None] * len(requests)
        pending = dict(by_gen)
        attempts = 0
        while pending:
            refs = {}
            for g, ks in pending.items():
                refs[g] = self.generators[g].generate_turns.remote([requests[k] for k in ks], *self._housekeeping(g))
            retry: dict[int, list[int]] = {}
            for g, ref in refs.items():
                try:
                    for k, o in zip(pending[g], ray.get(ref)):
                        out[k] = o
                except RayActorError as err:
                    self.failures += 1
                    log.warning("generator %d died during a call (%s); waiting for its restart", g, type(err).__name__)
                    if self._wait_restart(g):
                        retry[g] = pending[g]
                    else:  # gone for good: move its sessions elsewhere
                        self.alive[g] = False
                        moved = [requests[k] for k in pending[g]]
                        for r in moved:
                            self.owner.pop(r.session_id, None)
                            self.tokens.pop(r.session_id, None)
                        self.load[g] = 0
                        self._place(moved)
                        for k in pending[g]:
                            retry.setdefault(self.owner[requests[k].session_id], []).append(k)
            pending = retry
            attempts += 1
            if pending and attempts > 2 * len(self.generators) + 2:
                raise RuntimeError(f"generation failed after {attempts} attempts")
        return out  # type: ignore[return-value]

    def _wait_restart(self, g: int) -> bool:
        """Whether generator ``g`` came back after a failed call (:func:`actors.liveness.wait_alive`)."""
        try:
            wait_alive(self.generators[g], f"generator {g}", self.restart_wait_s, "generators.max_restarts")
            return True
        except ActorGone as err:
            log.warning("%s", err)
            return False

    # -- streaming ------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue turns on their generators without waiting (``request_id`` is set if missing)."""
        if not requests:
            return
        self._place(requests)
        by_gen: dict[int, list[Request]] = {}
        for r in requests:
            if r.request_id is None:
                r.request_id = f"{r.session_id}#{len(r.token_ids)}"
            g = self.owner[r.session_id]
            self.outstanding[g][r.request_id] = r
            by_gen.setdefault(g, []).append(r)
        for g, reqs in by_gen.items():
            if self.instance[g] is None:  # learn the process we talk to, to notice restarts
                self.instance[g] = self._instance_of(g)
            self.generators[g].submit.remote(reqs, *self._housekeeping(g))

    def busy(self) -> list[int]:
        """Generators with outstanding turns."""
        return [g for g, out in enumerate(self.outstanding) if out]

    def poll(self, g: int, max_steps: int = 64):
        """Start a poll on generator ``g``; returns the object ref (give it to ``collect``)."""
        return self.generators[g].poll.remote(max_steps)

    def collect(self, g: int, ref) -> list[GenerationOutput]:
        """The finished turns of a completed poll; replays outstanding turns after a restart."""
        import ray
        from ray.exceptions import RayActorError

        try:
            instance, outs = ray.get(ref)
        except RayActorError as err:
            self.failures += 1
            log.warning("generator %d died during a poll (%s); waiting for its restart", g, type(err).__name__)
            if not self._wait_restart(g):
                self._evacuate(g)
                return []
            instance, outs = None, []
        if instance is None or (self.instance[g] is not None and instance != self.instance[g]):
            self._resubmit(g)
            return []
        self.instance[g] = instance
        done = []
        for o in outs:
            if self.outstanding[g].pop(o.request_id, None) is not None:  # else a stale duplicate
                done.append(o)
        return done

    def _resubmit(self, g: int) -> None:
        """Generator ``g`` restarted: its queue and sessions are gone; send the outstanding turns again."""
        self.instance[g] = self._instance_of(g)
        reqs = list(self.outstanding[g].values())
        log.warning("generator %d restarted: replaying %d outstanding turns from their histories", g, len(reqs))
        self._release[g], self._forks[g] = [], []
        if reqs:
            self.generators[g].submit.remote(reqs, [])

    def _instance_of(self, g: int) -> str:
        import ray
        from ray.exceptions import RayActorError

        while True:
            try:
                return ray.get(self.generators[g].instance_id.remote())
            except RayActorError:
                if not self._wait_restart(g):
                    raise

    def _evacuate(self, g: int) -> None:
        self.alive[g] = False
        reqs = list(self.outstanding[g].values())
        self.outstanding[g] = {}
        for r in reqs:
            self.owner.pop(r.session_id, None)
            self.tokens.pop(r.session_id, None)
        self.load[g] = 0
        self.submit(reqs)

    def versions(self) -> list[Any]:
        import ray

        return ray.get([g.version.remote() for g in self.generators])
