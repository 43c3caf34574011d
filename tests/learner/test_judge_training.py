"""Training with the judge (``judge.enabled``) through the real pipeline: the shipped demo judge in its own
Ray actor scores every search turn, its scores reach the turn rewards, metrics.jsonl and Prometheus, and
a judge actor that dies inside a call (``faults.kill`` actor ``judge``) loses no episode."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from common import metrics as M
from learner.cli import main

REPO = Path(__file__).resolve().parents[2]
G, PROMPTS, STEPS = 2, 2, 3


def _scrape(run_dir: Path, found: dict, stop: threading.Event) -> None:
    """Read /metrics over HTTP while the run trains, until the judge's counter is non-zero."""
    while not stop.is_set():
        try:
            body = urllib.request.urlopen((run_dir / "metrics_endpoint.txt").read_text().strip(), timeout=2).read()
            lines = [ln for ln in body.decode().splitlines() if ln.startswith("turnrl_judge_requests_total ")]
            if lines and float(lines[0].split()[1]) > 0:
                found["body"] = body.decode()
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def judged_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judge")
    run_dir = tmp / "run"
    overrides = [
        f"model.path={REPO / 'deploy/warmstart'}", f"judge.model_path={REPO / 'deploy/judge'}",
        f"data.dir={tmp / 'data'}", "data.num_people=300",
        f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={G}", "learner.micro_batch_size=4",
        f"learner.total_steps={STEPS}", "eval.num_questions=2", "eval.greedy=false", "checkpoint.every_steps=0",
        "metrics.discovery_dir=null", "metrics.linger_s=0",
        "judge.enabled=true", "judge.turn_weight=0.5", "judge.outcome_weight=0.25", "judge.num_cpus=0.5",
        "env.rewards.result_contains_answer=0.0",
        "faults.kill=[{actor: judge, index: 0, after_step: 1}]", "faults.restart_wait_s=300",
    ]
    err, found, stop = io.StringIO(), {}, threading.Event()
    scraper = threading.Thread(target=_scrape, args=(run_dir, found, stop), daemon=True)
    scraper.start()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["train", "--config", str(REPO / "deploy/configs/local.yaml"), "--run-dir", str(run_dir),
                         *overrides])
    finally:
        stop.set()
        scraper.join(timeout=5)
    assert code == 0, err.getvalue()[-3000:]
    return run_dir, found


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_judge_scores_reach_the_metrics_and_every_episode_is_trained(judged_run) -> None:
    run_dir = judged_run[0]
    lines = _lines(run_dir)
    assert len(lines) == STEPS
    first = lines[0]
    episodes = PROMPTS * G
    assert first[M.JUDGE_REQUESTS] >= episodes  # every episode's answer, plus its searches
    assert 0.0 <= first[M.JUDGE_TURN_SCORE] <= 1.0 and 0.0 <= first[M.JUDGE_OUTCOME_SCORE] <= 1.0
    assert first[M.JUDGE_THROUGHPUT] > 0 and first[M.TIME_JUDGE] > 0
    assert first[M.JUDGE_FAILURES] == 0
    assert all(b[M.JUDGE_REQUESTS] >= a[M.JUDGE_REQUESTS] for a, b in zip(lines, lines[1:]))  # running totals
    # Step 2: the judge actor died inside a call; Ray restarted it and the batch was sent again (a retry), so no
    # score was lost to it and no episode either.
    assert lines[0][M.JUDGE_RETRIES] == 0 and lines[1][M.JUDGE_RETRIES] >= 1
    assert lines[-1]["actors/restarts/judge"] == 1 and lines[-1][M.JUDGE_FAILURES] == 0
    audit = json.loads((run_dir / "run_summary.json").read_text())["audit"]
    assert audit[M.AUDIT_TRAINED] == STEPS * episodes and audit[M.AUDIT_ABANDONED] == 0
    assert audit[M.AUDIT_UNACCOUNTED] == 0 and audit[M.AUDIT_DUPLICATES] == 0


def test_judge_components_are_in_the_rewards_trained_on(judged_run) -> None:
    """The learner's batch carries the judge's components: in step 1 (no failure) every trained episode's
    answer was judged once, so the batch's mean outcome component is outcome_weight x the judge's mean score."""
    import yaml

    run_dir = judged_run[0]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["judge"]["enabled"] is True and cfg["env"]["rewards"]["result_contains_answer"] == 0.0
    first = _lines(run_dir)[0]
    assert first[M.REWARD_JUDGE_OUTCOME] == pytest.approx(0.25 * first[M.JUDGE_OUTCOME_SCORE], abs=1e-5)
    assert 0.0 < first[M.REWARD_JUDGE_TURN] <= 0.5 * cfg["env"]["max_turns"]
    assert first[M.REWARD_TURN] >= first[M.REWARD_JUDGE_TURN] - 1e-6  # a part of the turn reward


def test_prometheus_serves_the_judge_metrics(judged_run) -> None:
    body = judged_run[1].get("body", "")  # scraped over HTTP on loopback while the run trained
    for name in (M.JUDGE_REQUESTS, M.JUDGE_FAILURES, M.JUDGE_RETRIES, M.JUDGE_TURN_SCORE, M.JUDGE_THROUGHPUT):
        assert f"{M.prometheus_name(name)} " in body, name
    assert "turnrl_perf_time_judge_seconds_count" in body  # a duration: a histogram
