"""A few RL steps through the real actors: Ray, the Arrow queue, DeepSpeed, HTTP /metrics.

Uses the shipped warm-start policy (deploy/warmstart) so rewards are not all zero and the
policy really moves.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _scrape(run_dir: Path, found: dict, stop: threading.Event) -> None:
    endpoint = run_dir / "metrics_endpoint.txt"
    while not stop.is_set():
        try:
            url = endpoint.read_text().strip()
            body = urllib.request.urlopen(url, timeout=2).read().decode()
            if "turnrl_train_step" in body:
                found["url"], found["body"] = url, body
                value = [ln for ln in body.splitlines() if ln.startswith("turnrl_train_step ")]
                if value and float(value[0].split()[1]) >= 1:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def test_few_rl_steps_through_real_actors(tmp_path, monkeypatch):
    import ray

    from learner.driver import train

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "e2e"
    cfg = load_config(REPO / "deploy/configs/local.yaml", [
        f"model.path={REPO / 'deploy/warmstart'}", f"data.dir={tmp_path / 'data'}", f"run.run_dir={run_dir}",
        "learner.total_steps=2", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
        "learner.micro_batch_size=8", "eval.num_questions=8", "eval.greedy=false", "learner.lr=0.01",
        "eval.every_steps=2", "eval.extra_steps=[1]", "data.max_hops=2",
    ])
    found: dict = {}
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(run_dir, found, stop), daemon=True)
    scraper.start()
    try:
        train(cfg)
    finally:
        stop.set()
        scraper.join(timeout=5)
        if ray.is_initialized():
            ray.shutdown()

    # /metrics answered over HTTP on loopback while training ran
    assert found.get("url", "").startswith("http://127.0.0.1:")
    assert "turnrl_rollout_reward_total_mean" in found["body"]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    # generators received the last pushed version
    assert summary["generator_versions"] == [2]
    # every transition passed through the Arrow queue and none is left behind
    q = summary["queue"]
    assert q["queue/put/rows_total"] > 0
    assert q["queue/put/rows_total"] == q["queue/get/rows_total"]
    # parameters changed
    before = load_file(str(REPO / "deploy/warmstart/model.safetensors"))
    after = load_file(str(run_dir / "policy/model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged tensors: {set(before) - set(changed)}"
    # run directory contents
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["train/policy_version"] == 2
    # eval.every_steps: the held-out curve, in the log (eval/*) and in eval.json; the last point is "trained"
    logged = [json.loads(x) for x in lines]
    assert all(0.0 <= r["eval/answer_in_result/rate"] <= 1.0 and "eval/exact_match/rate" in r for r in logged)
    results = json.loads((run_dir / "eval.json").read_text())
    assert [p["step"] for p in results["curve"]] == [0, 1, 2]
    assert results["curve"][0]["exact_match"] == results["warm_start"]["exact_match"]
    assert {k: v for k, v in results["curve"][-1].items() if k != "step"} == results["trained"]
    # data.max_hops=2: the held-out questions of two hops get their own figures (the second search)
    assert results["trained"]["multi_hop_questions"] >= 1
    assert 0.0 <= results["trained"]["multi_hop_answer_in_result"] <= 1.0
    assert all("eval/multi_hop/searches/mean" in r for r in logged)
    assert logged[-1]["eval/exact_match/rate"] == results["trained"]["exact_match"]
    ev = json.loads((run_dir / "eval.json").read_text())
    for key in ("warm_start", "trained"):
        assert {"exact_match", "tool_success", "answer_in_result"} <= set(ev[key])
    assert (run_dir / "config.yaml").exists() and (run_dir / "learning_curves.png").exists()
