"""`turnrl train ... rollout.tree.branch_turns=[1] algorithm.advantage=tree_grpo` through the real actors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TREE = ["rollout.tree.branch_turns=[1]", "rollout.tree.children=2", "algorithm.advantage=tree_grpo"]


def test_tree_rollouts_train_through_the_pipeline(ray_local, tmp_path, monkeypatch):
    from learner.driver import train

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tree"
    cfg = load_config(REPO / "deploy/configs/local.yaml", [
        f"model.path={REPO / 'deploy/warmstart'}", f"data.dir={tmp_path / 'data'}", f"run.run_dir={run_dir}",
        "learner.total_steps=2", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
        "learner.micro_batch_size=8", "eval.num_questions=8", "eval.greedy=false", *TREE])
    train(cfg)  # on the session's Ray (tests/conftest.py), as the other training tests
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    assert sum(r["rollout/forked_episodes/count"] for r in logged) > 0  # the roots searched, the leaves forked
    assert [r["rollout/episodes/total"] for r in logged] == [16, 32]  # 4 questions x 4 leaves a step
    for r in logged:
        # the generators sampled fewer action tokens than 16 independent episodes would hold: shared first turns
        assert r["rollout/generated_tokens/total"] < 16 * r["rollout/action_tokens/mean"]
    assert any(r.get("train/advantage/turn1/std", 0.0) > 0 for r in logged)  # siblings told apart at turn 1
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["queue"]["queue/put/rows_total"] == summary["queue"]["queue/get/rows_total"]


@pytest.mark.parametrize("overrides,field", [
    (["algorithm.advantage=tree_grpo"], "algorithm.advantage"),
    (["rollout.tree.branch_turns=[1]"], "rollout.tree.branch_turns"),
    ([*TREE, "algorithm.group_size=6", "rollout.tree.children=4"], "algorithm.group_size"),
    ([*TREE, "rollout.tree.branch_turns=[2]"], "rollout.tree.branch_turns"),
    ([*TREE, "rollout.tree.branch_turns=[0]"], "rollout.tree.branch_turns"),
    ([*TREE, "rollout.partial_rollouts=abort"], "rollout.partial_rollouts"),
    (["rollout.tree.children=3"], "rollout.tree.children"),
])
def test_tree_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"`{field}`"):
        load_config(REPO / "deploy/configs/local.yaml", overrides)
