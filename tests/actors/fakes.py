"""Light stand-ins for the env workers and the replay queue (no BM25 index, no Arrow queue)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeStep:
    observation_text: str
    turn_reward: dict[str, float]
    done: bool
    outcome_reward: dict[str, float] | None
    info: dict[str, Any] = field(default_factory=dict)


class ScriptedEnv:
    """Episodes of ``max_turns`` turns; the observation depends on the turn and the action length."""

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns
        self.turns: dict[str, int] = {}

    def reset(self, episode_ids, examples):
        for eid in episode_ids:
            self.turns[eid] = 0
        return [[{"role": "system", "content": "Use the tool."}, {"role": "user", "content": ex["question"]}]
                for ex in examples]

    def step(self, episode_ids, actions, final=None):
        out = []
        for k, (eid, action) in enumerate(zip(episode_ids, actions)):
            self.turns[eid] += 1
            done = self.turns[eid] >= self.max_turns or bool(final and final[k])
            out.append(FakeStep(f"<result>Karo {len(action) % 7} Ralomek</result>", {"tool": 0.1}, done,
                                {"exact_match": 0.0} if done else None, {"tool_called": True}))
        return out

    def close(self, episode_ids):
        for eid in episode_ids:
            self.turns.pop(eid, None)


class ListQueue:
    """Keeps every RecordBatch it is given."""

    def __init__(self):
        self.batches = []

    def put(self, batch) -> int:
        self.batches.append(batch)
        return len(self.batches)

    def rows(self) -> list[dict]:
        return [r for b in self.batches for r in b.to_pylist()]


class LocalHandle:
    """Call a plain object through the actor-handle syntax (``h.method.remote(...)``) in this process.

    Results go through ``ray.put`` so callers can ``ray.get`` them; no worker process is started.
    """

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str):
        method = getattr(self._obj, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                import ray

                return ray.put(method(*args, **kwargs))

        return _Method
