"""Is a restarted actor back? The one rule every caller follows.

Ray restarts a crashed actor up to its ``max_restarts``. A call *in flight* when it died fails
(``RayActorError``: ``ActorUnavailableError`` or ``ActorDiedError``); that says nothing about
whether it will come back. So callers ask with :func:`wait_alive`, which pings it:

* the ping answers: it is back (calls to a restarting actor wait for the restart);
* ``ActorUnavailableError`` or a timeout: it is restarting, ask again until ``timeout_s``;
* ``ActorDiedError``: it is dead for good (its restarts are used up), :class:`ActorGone` at once.

Measured on Ray 2.60: after ``ray.kill(no_restart=False)`` the call in flight raises
``ActorUnavailableError`` and a new ping waits and answers from the new process; once the restarts
are spent, a ping raises ``ActorDiedError`` immediately.
"""

from __future__ import annotations

import time
from typing import Any


class ActorGone(RuntimeError):
    """The actor did not come back: its restarts are used up, or it did not answer within the wait."""


def wait_alive(handle: Any, what: str, timeout_s: float, hint: str = "") -> None:
    """Block until ``handle.ping`` answers; :class:`ActorGone` when it is dead for good or after ``timeout_s``.

    ``what`` names the actor in the error ("env worker 2"), ``hint`` the config key that governs it.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    deadline = time.time() + timeout_s
    see = f" (see {hint})" if hint else ""
    while True:
        try:
            ray.get(handle.ping.remote(), timeout=max(1.0, min(10.0, deadline - time.time())))
            return
        except ActorDiedError as err:
            raise ActorGone(f"the {what} died and will not be restarted{see}: {err}") from None
        except (ActorUnavailableError, GetTimeoutError) as err:
            if time.time() >= deadline:
                raise ActorGone(f"the {what} did not come back within {timeout_s:.0f} s{see}: {err}") from None
            time.sleep(0.2)
