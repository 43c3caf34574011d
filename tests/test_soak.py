"""Soak: the embedded training for many steps while actors are killed at random; the audit must balance.

Marked slow (``make test-slow``). ``TURNRL_SOAK_STEPS`` sets the length (default 200) and
``TURNRL_SOAK_SEED`` the kill schedule. Env workers, generators and the rollout worker are killed
mid-episode at random steps (Ray restarts them); learner rank 0 is killed twice, each time the run
stops and is resumed from its newest checkpoint. At the end every step is logged exactly once, the
policy version equals the step count, and every episode is trained exactly once or accounted for.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import pytest

from common import metrics as M
from learner.cli import main

REPO = Path(__file__).resolve().parents[1]
G, PROMPTS = 2, 2


def kill_schedule(steps: int, seed: int, p: float = 0.15) -> tuple[list[dict], list[int]]:
    """Mid-episode kills (each role at least once, then a random one in a step with probability ``p``;
    at most one per step) and the two steps whose learner is killed."""
    rnd = random.Random(seed)
    roles = ["env_worker", "generator", "rollout"]
    candidates = list(range(2, steps + 1))
    forced = dict(zip(rnd.sample(candidates, min(len(roles), len(candidates))), roles))
    kills = []
    for s in candidates:
        role = forced.get(s) or (rnd.choice(roles) if rnd.random() < p else None)
        if role:
            kills.append({"actor": role, "index": 0, "after_step": s - 1})
    learner_steps = sorted({max(2, steps // 3), max(3, 2 * steps // 3)})
    return kills, [s for s in learner_steps if s <= steps]


def _flow(kills: list[dict]) -> str:
    return "[" + ", ".join("{actor: %s, index: %d, after_step: %d}" % (k["actor"], k["index"], k["after_step"])
                           for k in kills) + "]"


@pytest.mark.slow
def test_soak_with_random_kills_and_learner_crashes(ray_local, tmp_path):
    steps = int(os.environ.get("TURNRL_SOAK_STEPS", "200"))
    kills, learner_steps = kill_schedule(steps, int(os.environ.get("TURNRL_SOAK_SEED", "0")))
    run_dir = tmp_path / "soak"
    base = [f"model.path={REPO / 'deploy/warmstart'}", f"data.dir={tmp_path / 'data'}", "data.num_people=300",
            f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={G}", "learner.micro_batch_size=4",
            f"learner.total_steps={steps}", "eval.num_questions=2", "eval.greedy=false",
            "eval.before_training=false", "checkpoint.every_steps=3", "metrics.discovery_dir=null",
            "env.max_restarts=-1", "generators.max_restarts=-1", "rollout.max_restarts=1000",
            "faults.restart_wait_s=600"]  # a loaded machine restarts processes slowly
    pending = list(learner_steps)
    argv = ["train", "--config", str(REPO / "deploy/configs/local.yaml"), "--run-dir", str(run_dir)]
    crashes = 0
    while True:
        learner_kills = [{"actor": "learner", "index": 0, "after_step": s - 1} for s in pending[:1]]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv + base + [f"faults.kill={_flow(kills + learner_kills)}"])
        if code == 0:
            break
        assert code == 3 and "--resume" in err.getvalue(), err.getvalue()[-3000:]
        crashes += 1
        pending = pending[1:]  # that learner kill fired; resume without it
        argv = ["train", "--resume", str(run_dir)]
    assert crashes == len(learner_steps)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, steps + 1))
    assert lines[-1][M.POLICY_VERSION] == steps
    assert all(x[M.AUDIT_DUPLICATES] == 0 and x[M.AUDIT_UNACCOUNTED] == 0 for x in lines)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    audit = summary["audit"]
    assert audit[M.AUDIT_TRAINED] == steps * PROMPTS * G == audit[M.AUDIT_COMPLETED]
    assert audit[M.AUDIT_STARTED] == audit[M.AUDIT_TRAINED] + audit[M.AUDIT_ABANDONED] + audit[M.AUDIT_STALE]
    assert audit[M.AUDIT_DUPLICATES] == 0 and audit[M.AUDIT_UNACCOUNTED] == 0
    restarts = lines[-1]
    per_role = {r: sum(k["actor"] == r for k in kills) for r in ("env_worker", "generator", "rollout")}
    for role, n in per_role.items():  # every kill of the final timeline restarted its actor once
        assert restarts[M.ACTOR_RESTARTS_ROLE.format(role=role)] == n, (role, restarts)
    assert audit[M.AUDIT_ROLLOUT_RETRIES] == per_role["rollout"]
    assert audit[M.AUDIT_ABANDONED] == per_role["rollout"] * PROMPTS * G
    assert summary["generator_versions"] == [steps] and summary["learner_version"] == steps
    print(f"soak: {steps} steps, {len(kills)} mid-episode kills ({per_role}), "
          f"{crashes} learner crashes + resumes; audit {audit}; restarts "
          f"{ {k: v for k, v in restarts.items() if k.startswith('actors/restarts')} }")
