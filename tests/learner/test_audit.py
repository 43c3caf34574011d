"""The pure parts of checkpointing and fault handling: the id ledger, the audit, checkpoint files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from common import metrics as M
from learner.checkpoint import (config_fingerprint, check_compatible, latest_checkpoint, list_checkpoints, prune,
                                read_state, rng_state, set_rng_state, step_dir, truncate_metrics, write_state)
from learner.faults import EpisodeAudit, IdSet, crash_message, kills_due


def test_idset_counts_duplicates_and_compresses_runs():
    s = IdSet()
    assert s.add(range(0, 8)) == 0 and s.add([10, 11, 9]) == 0
    assert s.intervals() == [[0, 8], [9, 12]]
    assert s.add([8]) == 0 and s.intervals() == [[0, 12]]  # the gap closes into one run
    assert s.add([3, 11, 12, 12]) == 3  # 3 and 11 were there; 12 twice in one batch
    assert len(s) == 13 and 12 in s and 13 not in s and -1 not in s
    assert IdSet(s.intervals()).intervals() == s.intervals()


def test_idset_matches_a_python_set_on_random_batches():
    rnd = random.Random(0)
    ref: set[int] = set()
    s = IdSet()
    for _ in range(300):
        batch = [rnd.randrange(0, 400) for _ in range(rnd.randrange(0, 12))]
        expected = sum(1 for i, x in enumerate(batch) if x in ref or x in batch[:i])
        assert s.add(batch) == expected
        ref.update(batch)
        assert len(s) == len(ref)
    assert all((x in s) == (x in ref) for x in range(-2, 402))


def test_audit_balances_and_survives_a_round_trip():
    a = EpisodeAudit()
    a.complete({"episodes": [{"episode_id": i} for i in range(4)], "env_replayed": 2})
    a.train(range(4))
    a.abandon(4)  # a rollout attempt lost to a crash: its ids 4..7 are never trained
    a.complete({"episodes": [{"episode_id": i} for i in range(8, 12)]})
    a.train([8, 9, 10, 11, 8])  # rows of one episode repeat in a batch: counted once
    c = a.counts(started=12, stale_episodes=0)
    assert c[M.AUDIT_TRAINED] == 8 and c[M.AUDIT_UNACCOUNTED] == 0 and c[M.AUDIT_DUPLICATES] == 0
    assert c[M.AUDIT_ENV_REPLAYED] == 2
    assert a.train([11]) == 0 and a.counts(12)[M.AUDIT_DUPLICATES] == 1  # trained twice: caught
    b = EpisodeAudit()
    b.load_state(json.loads(json.dumps(a.state())))
    assert b.counts(12) == a.counts(12)
    assert M.AUDIT_UNACCOUNTED not in a.counts(12, sync=False)


def test_checkpoint_files_latest_prune_and_metrics_truncation(tmp_path: Path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        d = step_dir(root, step)
        d.mkdir(parents=True)
        write_state(d, {"step": step})
    (root / "step_000004.partial").mkdir()  # a save cut by a crash: never resumed from
    step_dir(root, 5).mkdir()  # no driver state: incomplete
    assert [d.name for d in list_checkpoints(root)] == ["step_000001", "step_000002", "step_000003"]
    assert latest_checkpoint(root).name == "step_000003" and read_state(latest_checkpoint(root))["step"] == 3
    removed = prune(root, keep=2)
    assert sorted(d.name for d in removed) == ["step_000001", "step_000004.partial"]
    (root / "step_000003" / "driver_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="driver_state.json"):
        read_state(root / "step_000003")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tra')
    assert truncate_metrics(metrics, 2) == 2
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]


def test_rng_state_round_trips_through_json():
    import numpy as np

    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), float(np.random.rand()))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand())) == a


def test_compatibility_and_crash_message(tmp_path: Path):
    from common.config import ConfigError, load_config

    cfg = load_config(None, [])
    state = {"config": config_fingerprint(cfg)}
    check_compatible(cfg, state, tmp_path)
    changed = load_config(None, ["run.seed=7"])
    with pytest.raises(ConfigError, match=r"`run.seed` = 7.*written with 0"):
        check_compatible(changed, state, tmp_path)
    msg = crash_message(tmp_path, [1], 5, RuntimeError("x"), tmp_path / "step_000004", 2)
    assert f"--resume {tmp_path}" in msg and "step_000004" in msg and "during step 5" in msg
    assert "checkpoint.every_steps > 0" in crash_message(tmp_path, [0], 1, RuntimeError("x"), None, 0)
    kills = load_config(None, ["faults.kill=[{actor: rollout, after_step: 2}, {actor: generator, after_step: 0}]"])
    assert [k.actor for k in kills_due(kills, 3)] == ["rollout"] and kills_due(kills, 2) == []
