"""The tensor-agent section of docs/results.md (learner/tensor_results.py): numbers from run directories,
a hand-written note and the LLM report's sections kept across rewrites, and the grid's rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.config import ConfigError
from learner.tensor_results import NOTE_END, NOTE_START, SECTION, write_agent_report
from learner.experiment import expand_grid, load_experiment

REPO = Path(__file__).resolve().parents[2]


def _experiment(tmp_path: Path, **extra) -> Path:
    text = (REPO / "deploy/configs/arm_experiment.yaml").read_text()
    text = text.replace("base_config: deploy/configs/arm.yaml", f"base_config: {REPO / 'deploy/configs/arm.yaml'}")
    text = text.replace("out_dir: runs/arm-comparison", f"out_dir: {tmp_path / 'runs'}")
    text = text.replace("path: docs/results.md", f"path: {tmp_path / 'results.md'}")
    text = text.replace("figures_dir: docs/results", f"figures_dir: {tmp_path / 'figs'}")
    for key, value in extra.items():
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def _fake_run(run_dir: Path, curve: list[float], final_grasp: float) -> None:
    """A finished run's eval.json: a held-out success curve every 20 steps."""
    run_dir.mkdir(parents=True)
    pts = [{"step": 20 * i, "success": v, "grasped": final_grasp, "aimed": 0.5, "return": v + 1, "turns": 3.0}
           for i, v in enumerate(curve)]
    ev = {"curve": pts, "trained": {k: v for k, v in pts[-1].items() if k != "step"},
          "trained_greedy": {"success": curve[-1]}, "wall_time_s": 30.0}
    (run_dir / "eval.json").write_text(json.dumps(ev))


def test_section_numbers_pairs_and_kept_text(tmp_path):
    exp = load_experiment(_experiment(tmp_path))
    runs = expand_grid(exp)
    assert {r.estimator for r in runs} == {"grpo_or", "grpo_mr", "mt_grpo_k", "mt_ppo", "gigpo"} and len(runs) == 50  # 2 tasks
    for r in runs:  # mt_grpo_k quicker than grpo_or on every seed; the others in between
        base = {"grpo_or": 0.0, "grpo_mr": 0.05, "mt_grpo_k": 0.2, "mt_ppo": 0.1, "gigpo": 0.1}[r.estimator] + 0.01 * r.seed
        _fake_run(r.run_dir, [0.0, base, base + 0.2, 0.5], final_grasp=0.9)
    report = tmp_path / "results.md"
    report.write_text("# Credit-assignment comparison\n\n## Results\n\nLLM numbers.\n\n## Discussion\n\nMine.\n")
    write_agent_report(exp, runs, {"sessions": []})
    text = report.read_text()
    assert text.index("## Results") < text.index(SECTION) < text.index("## Discussion")  # inserted before it
    assert "LLM numbers." in text and "Mine." in text
    section = text[text.index(SECTION):text.index("## Discussion")]
    row = next(ln for ln in section.splitlines() if ln.startswith("| mt_grpo_k |"))
    assert "0.500 [0.500, 0.500]" in row and "| 5 |" in row  # final success of all 5 seeds
    # areas (trapezoids over 3 intervals of 20 steps) differ by (0.2 / 2 + 0.2 + 0.2 / 2) / 3 = 0.133 on every seed
    assert "mt_grpo_k - grpo_or, area under held-out success: +0.133 [+0.133, +0.133]" in section
    assert "mt_grpo_k higher" in section
    assert "mt_grpo_k - grpo_or, final success: +0.000" in section and "not distinguishable" in section
    # mt_grpo_k reaches 0.3 at step 40 on every seed, grpo_or at step 60
    assert re.search(r"mt_grpo_k - grpo_or, steps to success >= 0.3 .*: -20.000 \[-20.000, -20.000\].*mt_grpo_k quicker",
                     section)
    assert (tmp_path / "figs/arm_curves.png").is_file()
    csv_rows = (tmp_path / "figs/arm_runs.csv").read_text().splitlines()
    assert csv_rows[0] == "task,estimator,seed,run,step,decoding,metric,value"
    # 25 arm runs x (4 sampled points x 5 metrics + the greedy success at the last step)
    assert len(csv_rows) == 1 + 25 * (4 * 5 + 1) and sum(",greedy,success," in r for r in csv_rows) == 25
    # a hand-written note between the markers survives a rewrite; the section is replaced, not duplicated
    text = text.replace(f"{NOTE_START}\n", f"{NOTE_START}\nThe arm says yes.\n", 1)
    report.write_text(text)
    write_agent_report(exp, runs, {"sessions": []})
    again = report.read_text()
    assert again.count(SECTION) == 1 and "The arm says yes." in again and NOTE_END in again


def test_the_llm_report_keeps_the_agent_section(tmp_path):
    from learner.results import write_report

    exp = load_experiment(_experiment(tmp_path))
    runs = expand_grid(exp)
    _fake_run(runs[0].run_dir, [0.0, 0.1, 0.3], final_grasp=0.5)
    report = tmp_path / "results.md"
    write_agent_report(exp, runs, {"sessions": []})
    llm = load_experiment(REPO / "deploy/configs/experiment.yaml")
    llm.report.path, llm.report.figures_dir, llm.report.readme = str(report), str(tmp_path / "llm"), None
    llm_runs = expand_grid(llm, out_dir=tmp_path / "none")  # no finished LLM run: an empty report
    write_report(llm, llm_runs, {"sessions": []}, 2)
    text = report.read_text()
    assert text.count(SECTION) == 1 and text.index(SECTION) < text.index("## Discussion")
    assert "| grpo_or |" in text[text.index(SECTION):]


@pytest.mark.parametrize("extra, message", [
    ({"warm_start_baseline": "true"}, "warm_start_baseline"),
])
def test_tensor_grid_rules(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_experiment(tmp_path, **extra))


def test_tensor_grid_rejects_the_readme_block(tmp_path):
    p = _experiment(tmp_path)
    p.write_text(p.read_text().replace("readme: null", "readme: README.md"))
    with pytest.raises(ConfigError, match="report.readme"):
        load_experiment(p)
