"""Tensor agents through the real pipeline (``turnrl train --config deploy/configs/arm.yaml``): Ray env
workers and rollout worker, tensor rows through the Arrow replay queue actor, the DeepSpeed learner, weight
pushes, metrics over HTTP, and held-out learning."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from common import metrics as M
from learner.cli import main

REPO = Path(__file__).resolve().parents[2]
ARM, CARTPOLE = str(REPO / "deploy/configs/arm.yaml"), str(REPO / "deploy/configs/cartpole.yaml")
SMALL = ["algorithm.prompts_per_step=4", "algorithm.group_size=4", "metrics.discovery_dir=null", "ray.num_cpus=4"]


def _train(config: str, run_dir: Path, *overrides: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", config, "--run-dir", str(run_dir), *SMALL, *overrides])
    return code, err.getvalue()


def _scrape(run_dir: Path, found: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            body = urllib.request.urlopen((run_dir / "metrics_endpoint.txt").read_text().strip(), timeout=2).read()
            text = body.decode()
            if "turnrl_train_policy_version 3.0" in text:
                found["body"] = text
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


@pytest.fixture(scope="module")
def arm_run(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("arm") / "run"
    found, stop = {}, threading.Event()
    scraper = threading.Thread(target=_scrape, args=(run_dir, found, stop), daemon=True)
    scraper.start()
    try:
        code, err = _train(ARM, run_dir, "learner.total_steps=3", "eval.num_episodes=16", "eval.every_steps=2",
                           "metrics.linger_s=3")
    finally:
        stop.set()
        scraper.join(timeout=5)
    assert code == 0, err[-3000:]
    return run_dir, found


def test_arm_run_directory(arm_run):
    run_dir, _ = arm_run
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "eval_table.txt", "learning_curves.png",
                 "policy/policy.safetensors"):
        assert (run_dir / name).is_file(), name
    ev = json.loads((run_dir / "eval.json").read_text())
    assert [p["step"] for p in ev["curve"]] == [0, 2, 3]
    assert set(ev) >= {"warm_start", "trained", "trained_greedy", "curve"}
    for key in ("success", "grasped", "aimed", "return", "turns", "steps"):
        assert 0 <= ev["trained"][key] < 10, key
    assert 2 <= ev["trained"]["turns"] <= 4  # the arm's episodes have 2 to max_grasps + 2 turns


def test_arm_metrics_and_queue(arm_run):
    run_dir, found = arm_run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r[M.POLICY_VERSION] for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:
        assert r[M.EPISODES_TOTAL] == 16 * r["step"]
        assert 2 <= r[M.TURNS_MEAN] <= 4 and r[M.AGENT_STEPS] >= r[M.TURNS_MEAN]
        assert M.LOSS in r and M.ENTROPY in r and M.ADV_TURN_MEAN.format(k=0) in r
        assert r[M.AGENT_ENV_ERRORS] == 0
    # every turn went through the queue: rows put = rows taken, groups of G = 4 complete
    assert rows[-1][M.QUEUE_PUT_ROWS] == rows[-1][M.QUEUE_GET_ROWS] > 0
    assert rows[-1][M.QUEUE_GET_GROUPS] == 12
    assert M.EVAL_SUCCESS in rows[1] and M.EVAL_SUCCESS not in rows[0]
    body = found.get("body", "")
    assert "turnrl_rollout_success_rate" in body and "turnrl_rollout_subgoal_grasped_rate" in body, body[:500]
    # every series of the dashboard's tensor-agent row is served by a tensor run's /metrics
    dash = json.loads((REPO / "deploy/grafana/dashboards/turnrl.json").read_text())
    row, names = "", set()
    for p in dash["panels"]:
        row = p["title"] if p.get("type") == "row" else row
        if p.get("type") != "row" and row.startswith("Tensor agents"):
            names |= {n for t in p["targets"] for n in re.findall(r"\bturnrl_\w+", t["expr"])}
    assert len(names) >= 6
    served = {ln.split(" ")[0].split("{")[0] for ln in body.splitlines() if ln and not ln.startswith("#")}
    assert names <= served, sorted(names - served)


def test_saved_policy_loads_into_the_same_module(arm_run):
    from safetensors.torch import load_file

    from common.tensor_policy import build_policy
    from env_workers.arm import ArmThrowEnv

    run_dir, _ = arm_run
    policy = build_policy("mlp", ArmThrowEnv.observation_shape, ArmThrowEnv.action_space, hidden=64, layers=2)
    policy.load_state_dict(load_file(str(run_dir / "policy/policy.safetensors")))


def test_gru_policy_with_mt_ppo_on_cartpole(ray_local, tmp_path):
    """A Gymnasium env, a recurrent policy and the critic estimator, end to end."""
    code, err = _train(CARTPOLE, tmp_path / "run", "learner.total_steps=2", "eval.num_episodes=4",
                       "eval.every_steps=0", "eval.greedy=false", "policy.kind=gru", "algorithm.advantage=mt_ppo",
                       "algorithm.ppo_epochs=1")
    assert code == 0, err[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 2 and all(M.CRITIC_VALUE_LOSS in r for r in rows)
    # one epoch on fresh rows: the learner's GRU over whole episodes gives the log-probs the rollout worker
    # sampled with step by step (ratio 1), so the weights it trains are the weights that acted
    assert all(abs(r[M.RATIO_MAX] - 1.0) < 1e-4 and abs(r[M.KL_K3]) < 1e-6 for r in rows), rows
    assert rows[0][M.TURNS_MEAN] >= 1 and rows[0][M.AGENT_STEPS] > rows[0][M.TURNS_MEAN]  # turns of 25 steps
    ev = json.loads((tmp_path / "run/eval.json").read_text())
    assert [p["step"] for p in ev["curve"]] == [0] and "trained_greedy" not in ev


def test_arm_learns_on_held_out_seeds(ray_local, tmp_path):
    """60 steps of MT-GRPO (K turns): the held-out grasp and return rise well above the initial policy's."""
    code, err = _train(ARM, tmp_path / "run", "algorithm.prompts_per_step=16", "algorithm.group_size=8",
                       "learner.total_steps=60", "eval.num_episodes=100", "eval.every_steps=60", "eval.greedy=false")
    assert code == 0, err[-3000:]
    ev = json.loads((tmp_path / "run/eval.json").read_text())
    start, end = ev["curve"][0], ev["curve"][-1]
    assert end["step"] == 60
    assert end["grasped"] >= start["grasped"] + 0.2, (start, end)
    assert end["return"] >= start["return"] + 0.3, (start, end)


@pytest.mark.parametrize("override, field", [
    ("algorithm.kl_coef=0.1", "algorithm.kl_coef"),
    ("algorithm.advantage=tree_grpo", "algorithm.advantage"),
    ("env.gym.turn_steps=5", "env.gym.turn_steps"),
    ("policy.factory=x:y", "policy.factory"),
    ("algorithm.lam=0.9", "algorithm.lam"),  # mt_grpo_k takes no lam
    ("env.arm.grasp_steps=0", "env.arm"),  # the env refuses it before Ray starts
])
def test_bad_config_fails_before_ray_naming_the_field(override, field, tmp_path, capsys):
    code = main(["train", "--config", ARM, "--run-dir", str(tmp_path / "run"), override])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
