"""Fault injection for tests and drills (``faults.kill`` in the config): kill an actor mid-episode.

A rollout worker holds a :class:`KillSwitch`. ``arm(role, index)`` marks an actor; the rollout worker
calls ``fire`` after its first turn's rows are in the replay queue, so the kill lands mid-episode.
Ray restarts the actor (``max_restarts``); what survives it is the fault-tolerance code's business
(``actors/env_client.py``, ``actors/pool.py``, ``learner/faults.py``).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

ROLES = ("env_worker", "generator", "rollout")


class KillSwitch:
    """Armed kills of ``role`` actors (``env_worker`` / ``generator`` by index, or ``rollout``: this worker)."""

    def __init__(self) -> None:
        self._armed: list[tuple[str, int]] = []

    def arm(self, role: str, index: int = 0) -> None:
        if role not in ROLES:
            raise ValueError(f"arm_kill: unknown role {role!r}; use one of {ROLES}")
        self._armed.append((role, index))

    def fire(self, env_workers: list, generators: list) -> None:
        """Kill what is armed with ``ray.kill(no_restart=False)``; a rollout worker kills itself and waits."""
        import ray

        armed, self._armed = self._armed, []
        for role, index in armed:
            log.warning("fault injection: killing %s %d mid-episode", role, index)
            if role == "rollout":
                ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                time.sleep(3600)  # the kill lands while we wait; nothing more is sent
            ray.kill((env_workers if role == "env_worker" else generators)[index], no_restart=False)
