"""Checkpoints, resume and dying actors, through the real actors at tiny sizes (one shared pair of runs).

Run A (``turnrl train``, 3 steps, a checkpoint after every step) meets one fault of each kind:

    step 1: env worker 0 and generator 0 killed mid-episode (after the step's first turn)
    step 2: the rollout worker killed mid-episode
    step 3: learner rank 0 killed before the update -> the job stops, naming the resumable run dir

Run B (``turnrl train --resume RUN_DIR``) continues from the step-2 checkpoint to step 3 and
exports the policy. The tests below read what the two runs left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from common import metrics as M
from learner.cli import main

REPO = Path(__file__).resolve().parents[2]
G, PROMPTS = 2, 2  # episodes per group, groups per step
KILLS = ("[{actor: env_worker, index: 0, after_step: 0}, {actor: generator, index: 0, after_step: 0}, "
         "{actor: rollout, index: 0, after_step: 1}, {actor: learner, index: 0, after_step: 2}]")


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = tmp / "run"
    overrides = [
        f"model.path={REPO / 'deploy/warmstart'}", f"data.dir={tmp / 'data'}", "data.num_people=300",
        f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={G}", "learner.micro_batch_size=4",
        "learner.total_steps=3", "learner.lr=0.01", "eval.num_questions=2", "eval.greedy=false",
        "checkpoint.every_steps=1", "checkpoint.keep=3", "metrics.discovery_dir=null", f"faults.kill={KILLS}",
        "faults.restart_wait_s=300",  # generous: a loaded machine restarts processes slowly
    ]
    code_a, err_a = _cli(["train", "--config", str(REPO / "deploy/configs/local.yaml"), "--run-dir", str(run_dir),
                          *overrides])
    crash_summary = json.loads((run_dir / "run_summary.json").read_text())
    metrics_a = (run_dir / "metrics.jsonl").read_text()
    code_b, err_b = _cli(["train", "--resume", str(run_dir), "faults.kill=[]"])  # config from RUN_DIR/config.yaml
    return {"dir": run_dir, "code_a": code_a, "err_a": err_a, "crash": crash_summary, "metrics_a": metrics_a,
            "code_b": code_b, "err_b": err_b}


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / "driver_state.json").read_text())


def test_learner_crash_ends_the_job_naming_the_resumable_run_dir(runs):
    assert runs["code_a"] == 3, runs["err_a"][-2000:]
    msg = runs["err_a"]
    assert "learner rank(s) [0] died during step 3" in msg
    assert f"--resume {runs['dir']}" in msg and "step_000002" in msg
    crash = runs["crash"]
    assert crash["status"] == "learner_crashed" and crash["checkpoint"].endswith("step_000002")
    # step 3 never logged in run A: the crash came before its update
    assert [json.loads(x)["step"] for x in runs["metrics_a"].splitlines()] == [1, 2]


def test_resume_continues_with_the_same_step_numbering_and_counters(runs):
    assert runs["code_b"] == 0, runs["err_b"][-2000:]
    run_dir = runs["dir"]
    lines = _lines(run_dir)
    assert [x["step"] for x in lines] == [1, 2, 3]  # each step exactly once across the two runs
    assert [x[M.POLICY_VERSION] for x in lines] == [1, 2, 3]
    assert lines[-1][M.STEP] == 3  # the learner's own step counter came back from the checkpoint
    s2, s3 = _state(run_dir, 2), _state(run_dir, 3)
    assert (s2["step"], s2["policy_version"], s3["step"], s3["policy_version"]) == (2, 2, 3, 3)
    # the sampler went on where it stopped (the rollout retry in step 2 re-ran the same prompts)
    assert s2["sampler"]["pos"] == 2 * PROMPTS and s3["sampler"]["pos"] == 3 * PROMPTS
    assert s3["sampler"]["epoch"] == s2["sampler"]["epoch"] == 0
    # the generators served the restored weights (version 2): step 3's turns lag the learner by 0
    assert lines[-1][M.POLICY_LAG_MAX] == 0
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["generator_versions"] == [3] and summary["learner_version"] == 3
    assert summary["resumed_from"].endswith("step_000002")
    ev = json.loads((run_dir / "eval.json").read_text())
    assert {"warm_start", "trained"} <= set(ev)  # the pre-training evaluation came back from the checkpoint


def test_every_episode_counted_exactly_once_through_faults_and_resume(runs):
    run_dir = runs["dir"]
    audit = json.loads((run_dir / "run_summary.json").read_text())["audit"]
    per_step = PROMPTS * G
    assert audit[M.AUDIT_TRAINED] == 3 * per_step  # three steps' worth, none twice
    assert audit[M.AUDIT_COMPLETED] == 3 * per_step
    assert audit[M.AUDIT_ABANDONED] == per_step  # the attempt the rollout worker died in
    assert audit[M.AUDIT_STARTED] == 4 * per_step
    assert audit[M.AUDIT_DUPLICATES] == 0 and audit[M.AUDIT_UNACCOUNTED] == 0 and audit[M.AUDIT_STALE] == 0
    assert audit[M.AUDIT_ROLLOUT_RETRIES] == 1
    assert audit[M.AUDIT_ENV_REPLAYED] >= 1  # episodes rebuilt on the restarted env worker, not restarted
    trained = _state(run_dir, 3)["audit"]["trained"]
    # ids 0-3 (step 1), 8-11 (step 2, after the abandoned 4-7), 12-15 (step 3, reissued after the resume)
    assert trained == [[0, 4], [8, 16]]
    lines = _lines(run_dir)
    assert all(x[M.AUDIT_UNACCOUNTED] == 0 and x[M.AUDIT_DUPLICATES] == 0 for x in lines)
    restarts = lines[-1]
    assert restarts["actors/restarts/env_worker"] == 1 and restarts["actors/restarts/generator"] == 1
    assert restarts["actors/restarts/rollout"] == 1  # carried over the resume
    q = json.loads((run_dir / "run_summary.json").read_text())["queue"]
    assert q[M.QUEUE_ABORTED_GROUPS] == PROMPTS and q[M.QUEUE_DROPPED_DUPLICATE] == 0


def test_final_policy_loads_with_transformers_and_matches_the_last_checkpoint(runs):
    from transformers import AutoModelForCausalLM

    run_dir = runs["dir"]
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "policy"), local_files_only=True, use_safetensors=True)
    ds = torch.load(run_dir / "checkpoints/step_000003/deepspeed/mp_rank_00_model_states.pt", weights_only=True)
    exported = model.state_dict()
    assert set(ds["module"]) <= set(exported)
    for k, v in ds["module"].items():
        assert torch.equal(exported[k], v), k
    warm = AutoModelForCausalLM.from_pretrained(str(REPO / "deploy/warmstart"), local_files_only=True)
    assert any(not torch.equal(exported[k], v) for k, v in warm.state_dict().items())
    assert ds["version"] == 3


def test_resume_refuses_what_it_cannot_continue(runs, tmp_path):
    run_dir = runs["dir"]
    code, err = _cli(["train", "--resume", str(run_dir), "algorithm.group_size=4", "learner.micro_batch_size=4"])
    assert code == 2 and "`algorithm.group_size` = 4" in err and "step_000003" in err
    empty = tmp_path / "no_checkpoints"
    empty.mkdir()
    code, err = _cli(["train", "--config", str(run_dir / "config.yaml"), "--resume", str(empty)])
    assert code == 2 and "no checkpoint in" in err and str(empty) in err
