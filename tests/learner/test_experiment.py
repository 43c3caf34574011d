"""``turnrl experiment``: the grid, resuming, the report's arithmetic, the Discussion kept on rewrite,
and one tiny real grid (warm start + one estimator) through Ray, the actors and DeepSpeed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from learner.cli import main as cli_main
from common.config import ConfigError, load_config
from learner.experiment import (
    build_configs,
    config_drift,
    expand_grid,
    load_experiment,
    merge_args,
    run_grid,
    run_status,
    select_runs,
)
from learner.results import (
    DISCUSSION,
    README_END,
    README_START,
    extract_section,
    write_report,
)
from learner.curve_stats import mean_curve, mean_std

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "deploy/configs/local.yaml")


def _write_exp(tmp_path: Path, **changes) -> Path:
    """A small experiment YAML in tmp_path (report, figures and README inside tmp_path too)."""
    tree = {
        "name": "t", "base_config": BASE, "out_dir": str(tmp_path / "runs"), "seeds": [0, 1, 2],
        "warm_start_baseline": True,
        "common": {"learner.total_steps": 5, "eval.num_questions": 10, "env.max_turns": 3},
        "tasks": {
            "two_turn": {"estimators": ["grpo_or", "mt_grpo"], "overrides": {"data.max_hops": 1, "env.max_turns": 2}},
            "multi_hop": {"estimators": ["mt_grpo_k"], "overrides": {"data.max_hops": 2}},
        },
        "report": {"path": str(tmp_path / "docs/results.md"), "figures_dir": str(tmp_path / "docs/results"),
                   "readme": str(tmp_path / "README.md"), "smooth": 1},
    }
    tree.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ grid


def test_grid_is_seed_major_and_overrides_layer_in_order(tmp_path):
    exp = load_experiment(_write_exp(tmp_path))
    runs = expand_grid(exp, extra=["learner.total_steps=7", "env.top_k=2"])
    # 3 seeds x (two_turn: warm_start, grpo_or, mt_grpo + multi_hop: warm_start, mt_grpo_k)
    assert [r.name for r in runs[:5]] == ["two_turn-warm_start-seed0", "two_turn-grpo_or-seed0",
                                          "two_turn-mt_grpo-seed0", "multi_hop-warm_start-seed0",
                                          "multi_hop-mt_grpo_k-seed0"]
    assert len(runs) == 15 and [r.seed for r in runs] == [0] * 5 + [1] * 5 + [2] * 5
    cfgs = {r.name: load_config(exp.base_config, list(r.overrides)) for r in runs}
    c = cfgs["two_turn-mt_grpo-seed1"]
    assert c.algorithm.advantage == "mt_grpo" and c.run.seed == 1
    assert c.env.max_turns == 2  # the task beats common (3)
    assert c.learner.total_steps == 7 and c.env.top_k == 2  # the command line beats common
    assert c.eval.num_questions == 10 and c.data.max_hops == 1
    assert c.run.run_dir == str(tmp_path / "runs/two_turn-mt_grpo-seed1") and c.run.name == "t-two_turn-mt_grpo-seed1"
    m = cfgs["multi_hop-mt_grpo_k-seed2"]
    assert (m.algorithm.advantage, m.data.max_hops, m.env.max_turns, m.run.seed) == ("mt_grpo_k", 2, 3, 2)
    w = cfgs["multi_hop-warm_start-seed0"]
    assert w.learner.total_steps == 0  # the grid's warm start beats the command line
    # each key appears once, so the printed command is exactly what runs
    keys = [a.split("=", 1)[0] for a in runs[0].overrides]
    assert len(keys) == len(set(keys))
    moved = expand_grid(exp, out_dir=tmp_path / "elsewhere")[0]
    assert moved.run_dir == tmp_path / "elsewhere/two_turn-warm_start-seed0"


def test_merge_args_keeps_the_last_value_of_each_key():
    assert merge_args(["a.x=1", "b.y=2"], ["a.x=3"], ["c.z=4", "b.y=5"]) == ["a.x=3", "c.z=4", "b.y=5"]


def test_config_drift_names_the_changed_keys():
    saved = {"learner": {"lr": 0.001, "total_steps": 16}, "run": {"seed": 0}}
    now = {"learner": {"lr": 0.002, "total_steps": 16}, "run": {"seed": 0}, "rollout": {"mode": "sync"}}
    assert config_drift(saved, now) == ["learner.lr: 0.001 -> 0.002", "rollout: None -> {'mode': 'sync'}"]
    assert config_drift(now, now) == []


def test_drift_warning_ignores_keys_added_since_the_run_and_names_real_changes(tmp_path, monkeypatch, caplog):
    """An old run's config.yaml lacks keys added later (their defaults keep the old behaviour) and names another
    run_dir (spelled relative, or the grid it was copied from); neither is drift. A changed value is, and the
    warning names it."""
    import logging

    monkeypatch.chdir(tmp_path)
    exp = load_experiment(_write_exp(tmp_path, seeds=[0], out_dir="runs"))
    runs = expand_grid(exp, out_dir=tmp_path / "runs")  # absolute, as with --out
    configs = build_configs(exp, runs)
    old, changed = runs[0], runs[1]
    for spec in (old, changed):
        tree = configs[spec.name].to_dict()
        tree["run"]["run_dir"] = f"runs/{spec.name}"
        del tree["algorithm"]["critic_lr"], tree["rollout"]["tree"]  # not there when the run trained
        if spec is changed:
            tree["learner"]["lr"] = 0.123
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
        (spec.run_dir / "eval.json").write_text(json.dumps({"trained": {"exact_match": 0.1}, "trained_greedy": {}}))
    with caplog.at_level(logging.WARNING, logger="learner.experiment"):
        run_grid(exp, [old, changed], train_fn=lambda cfg: None)
    warnings = [r.getMessage() for r in caplog.records if "different config" in r.getMessage()]
    assert len(warnings) == 1 and changed.name in warnings[0], warnings
    assert "learner.lr: 0.123 -> " in warnings[0] and "critic_lr" not in warnings[0] and "run_dir" not in warnings[0]


def test_select_runs_by_glob(tmp_path):
    runs = expand_grid(load_experiment(_write_exp(tmp_path)))
    assert {r.name for r in select_runs(runs, ["multi_hop-*-seed0"])} == {"multi_hop-warm_start-seed0",
                                                                         "multi_hop-mt_grpo_k-seed0"}
    assert len(select_runs(runs, ["*-grpo_or-*", "*-mt_grpo-*"])) == 6
    assert select_runs(runs, None) == runs
    with pytest.raises(ConfigError, match="matches no run"):
        select_runs(runs, ["nope-*"])


@pytest.mark.parametrize("changes, message", [
    ({"common": {"algorithm.advantage": "grpo_or"}}, r"`common` sets `algorithm.advantage`: the grid sets"),
    ({"common": {"lr": 1}}, r"`common` has key 'lr': must be a dotted run-config key"),
    ({"seeds": []}, r"`seeds` = \[\]: must be a non-empty list"),
    ({"seeds": [1, 1]}, r"`seeds` = \[1, 1\]"),
    ({"tasks": {"two turn": {"estimators": ["grpo_or"]}}}, r"`tasks.two turn`: task names must match"),
    ({"tasks": {"a": {"estimators": ["mt_grpoo"]}}}, r"`tasks.a.estimators` holds 'mt_grpoo': must be one of"),
    ({"tasks": {"a": {"estimators": ["grpo_or"], "overide": {}}}}, r"`tasks.a.overide`: unknown key; did you mean"),
    ({"tasks": {"a": ["grpo_or"]}}, r"`tasks.a` = \['grpo_or'\]: must be a mapping"),
    ({"report": {"smooth": 0}}, r"`report.smooth` = 0: must be >= 1"),
    ({"seedz": [0]}, r"`seedz`: unknown key; did you mean `seeds`"),
])
def test_experiment_config_errors_name_field_value_and_rule(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write_exp(tmp_path, **changes))


def test_grid_rejects_command_line_grid_keys_and_bad_run_keys_before_training(tmp_path):
    exp = load_experiment(_write_exp(tmp_path))
    with pytest.raises(ConfigError, match="the grid sets"):
        expand_grid(exp, extra=["run.seed=3"])
    runs = expand_grid(exp, extra=["learner.lrr=0.1"])

    def never(cfg):
        raise AssertionError("nothing may train when a run's config is invalid")

    with pytest.raises(ConfigError, match=r"run two_turn-warm_start-seed0: config field `learner.lrr`: unknown key"):
        run_grid(exp, runs, train_fn=never)


def test_shipped_experiment_config(tmp_path):
    path = REPO / "deploy/configs/experiment.yaml"
    uncommented = [ln for ln in path.read_text().splitlines() if re.match(r"^\s*[A-Za-z_.]+:", ln) and "#" not in ln]
    assert not uncommented, f"keys without a comment: {uncommented}"
    exp = load_experiment(path)
    assert exp.tasks["two_turn"].estimators == ["grpo_or", "grpo_mr", "mt_grpo", "mt_grpo_l02", "gigpo", "mt_ppo",
                                                "ppo", "tree_grpo_c4", "mt_grpo_judge",
                                                "mt_grpo_judge_rubric"]
    assert exp.variants["mt_grpo_l02"].overrides == {"algorithm.outcome_coef": 0.2}  # the seed's lambda
    judged = exp.variants["mt_grpo_judge"].overrides  # the judge's turn reward instead of the rubric's answer-in-result
    assert judged["judge.enabled"] is True and judged["env.rewards.result_contains_answer"] == 0.0
    assert exp.tasks["multi_hop"].estimators == ["grpo_or", "grpo_mr", "mt_grpo_k", "gigpo", "mt_ppo"]
    assert len(exp.seeds) >= 3
    runs = expand_grid(exp, out_dir=tmp_path)
    cfgs = [load_config(exp.base_config, list(r.overrides)) for r in runs]  # every run's config is valid
    two = [c for r, c in zip(runs, cfgs) if r.task == "two_turn"]
    multi = [c for r, c in zip(runs, cfgs) if r.task == "multi_hop"]
    assert {(c.data.max_hops, c.env.max_turns) for c in two} == {(1, 2)}
    assert {c.data.max_hops for c in multi} == {2} and min(c.env.max_turns for c in multi) >= 3
    readme = (REPO / "README.md").read_text()
    assert readme.count(README_START) == 1 and readme.count(README_END) == 1  # where the headline table goes
    trained = [c for r, c in zip(runs, cfgs) if r.estimator != "warm_start"]
    assert len({(c.learner.total_steps, c.algorithm.prompts_per_step, c.algorithm.group_size,
                 c.eval.num_questions) for c in trained}) == 1  # the same budget everywhere


@pytest.mark.parametrize("name, source, steps", [("experiment_budget.yaml", "experiment.yaml", 80),
                                                  ("experiment_budget160.yaml", "experiment_budget.yaml", 160)])
def test_the_budget_grids_continue_the_two_turn_runs_with_the_same_settings(tmp_path, monkeypatch, name, source,
                                                                           steps):
    """experiment_budget*.yaml: experiment.yaml's two-turn runs, the same settings but more steps, continued from
    the grid before them."""
    path = REPO / "deploy/configs" / name
    uncommented = [ln for ln in path.read_text().splitlines() if re.match(r"^\s*[A-Za-z_.]+:", ln) and "#" not in ln]
    assert not uncommented, f"keys without a comment: {uncommented}"
    monkeypatch.chdir(tmp_path)  # the configs' relative paths, with the grid directories continue_from names
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    for out in ("credit-comparison", "credit-budget80"):
        (tmp_path / "runs" / out).mkdir(parents=True)
    budget, grid = load_experiment(path), load_experiment(REPO / "deploy/configs/experiment.yaml")
    assert budget.continue_from == load_experiment(REPO / "deploy/configs" / source).out_dir
    assert budget.name == grid.name and budget.seeds == grid.seeds
    long_runs = {r.name: r for r in expand_grid(budget, out_dir=tmp_path)}
    short_runs = {r.name: r for r in expand_grid(grid, out_dir=tmp_path)}
    assert set(long_runs) < set(short_runs)
    for name, spec in long_runs.items():
        a = load_config(budget.base_config, list(spec.overrides)).to_dict()
        b = load_config(grid.base_config, list(short_runs[name].overrides)).to_dict()
        diffs = config_drift(b, a)
        expected = [] if spec.estimator == "warm_start" else [f"learner.total_steps: 40 -> {steps}"]
        assert diffs == expected, (name, diffs)


# -------------------------------------------------------------------------------- fake run dirs

# sampled eval per (task, estimator): one list per column, one value per seed
FAKE = {
    ("two_turn", "warm_start"): {"tool_success": [0.5, 0.5, 0.5], "answer_in_result": [0.1, 0.1, 0.1],
                                 "exact_match": [0.0, 0.1, 0.2], "format": [0.2, 0.2, 0.2]},
    ("two_turn", "grpo_or"): {"tool_success": [0.9, 0.9, 0.9], "answer_in_result": [0.2, 0.4, 0.9],
                              "exact_match": [0.4, 0.5, 0.6], "format": [1.0, 0.5, 0.75]},
    ("two_turn", "mt_grpo"): {"tool_success": [1.0, 0.8], "answer_in_result": [0.5, 0.7],
                              "exact_match": [0.3, 0.3], "format": [0.6, 0.8]},  # seed 2 never finished
    ("multi_hop", "mt_grpo_k"): {"tool_success": [0.7], "answer_in_result": [0.3],
                                 "exact_match": [0.25], "format": [0.5]},
}


def _fake_run(run_dir: Path, ev: dict[str, float], steps: int, reward0: float, greedy: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"trained": {**ev, "turns": 2.0, "truncated": 0.0, "episodes": 10.0}, "wall_time_s": 60.0,
            "steps": steps}
    if greedy:
        body["trained_greedy"] = {k: min(1.0, v + 0.1) for k, v in ev.items()}
    (run_dir / "eval.json").write_text(json.dumps(body))
    if steps:
        rows = [{"step": s, "rollout/reward/total/mean": reward0 + 0.1 * s, "rollout/answer_in_result/rate": 0.5,
                 "rollout/exact_match/rate": 0.1 * s} for s in range(1, steps + 1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_grid(tmp_path: Path, keys=FAKE) -> None:
    for (task, est), cols in keys.items():
        for seed in range(len(cols["exact_match"])):
            ev = {c: v[seed] for c, v in cols.items()}
            _fake_run(tmp_path / "runs" / f"{task}-{est}-seed{seed}", ev, 0 if est == "warm_start" else 4,
                      reward0=float(seed), greedy=(est == "grpo_or"))


def test_resume_skips_finished_runs_and_redoes_partial_ones(tmp_path):
    exp = load_experiment(_write_exp(tmp_path))
    runs = expand_grid(exp)
    _fake_grid(tmp_path)
    partial = tmp_path / "runs/two_turn-mt_grpo-seed2"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1}\n')  # died after one step, no eval.json
    assert run_status(partial) == "partial" and run_status(tmp_path / "runs/two_turn-grpo_or-seed0") == "done"
    assert run_status(tmp_path / "runs/multi_hop-mt_grpo_k-seed2") == "missing"
    seen = []

    def fake_train(cfg):
        run_dir = Path(cfg.run.run_dir)
        assert not run_dir.exists(), "a partial run must start from an empty directory"
        seen.append(run_dir.name)
        _fake_run(run_dir, {"exact_match": 1.0}, cfg.learner.total_steps, 0.0)

    out = run_grid(exp, runs, train_fn=fake_train)
    done_before = {f"{t}-{e}-seed{s}" for (t, e), c in FAKE.items() for s in range(len(c["exact_match"]))}
    assert set(out.skipped) == done_before
    assert seen == out.trained == [r.name for r in runs if r.name not in done_before]
    assert "two_turn-mt_grpo-seed2" in seen and not out.failed
    # a second invocation trains nothing
    again = run_grid(exp, runs, train_fn=fake_train)
    assert again.trained == [] and len(again.skipped) == len(runs)


def test_continue_from_copies_done_runs_and_continues_them_to_the_new_budget(tmp_path):
    """A 3-step grid continued to 6 steps: its runs are copied, the trained ones resumed from their step-3
    checkpoint (the warm start has nothing to continue); a run without a checkpoint at its last step is not."""
    source = tmp_path / "short"
    short = load_experiment(_write_exp(tmp_path, seeds=[0], out_dir=str(source)))
    for spec in expand_grid(short):
        steps = 0 if spec.estimator == "warm_start" else 3
        _fake_run(spec.run_dir, {"exact_match": 0.1}, steps, 0.0)
        if steps:  # grpo_or kept only an earlier checkpoint
            ckpt = spec.run_dir / ("checkpoints/step_000002" if spec.estimator == "grpo_or" else "checkpoints/step_000003")
            ckpt.mkdir(parents=True)
            (ckpt / "driver_state.json").write_text("{}")
    longer = _write_exp(tmp_path, seeds=[0], out_dir=str(tmp_path / "long"), continue_from=str(source),
                        common={"learner.total_steps": 6, "eval.num_questions": 10, "env.max_turns": 3,
                                "eval.greedy": False})
    exp = load_experiment(longer)
    runs = expand_grid(exp)
    continued = []

    def fake_continue(cfg, run_dir):
        assert cfg.learner.total_steps == 6 and (run_dir / "checkpoints/step_000003").is_dir()
        continued.append(run_dir.name)
        ev = json.loads((run_dir / "eval.json").read_text())
        (run_dir / "eval.json").write_text(json.dumps({**ev, "steps": 6}))

    def no_training(cfg):
        raise AssertionError(f"{cfg.run.run_dir} must be copied or continued, not trained from scratch")

    out = run_grid(exp, runs, train_fn=no_training, continue_fn=fake_continue)
    assert continued == out.trained == ["two_turn-mt_grpo-seed0", "multi_hop-mt_grpo_k-seed0"]
    assert all((tmp_path / "long" / r.name / "eval.json").is_file() for r in runs)  # every run copied
    assert json.loads((source / "two_turn-mt_grpo-seed0/eval.json").read_text())["steps"] == 3  # source untouched
    again = run_grid(exp, runs, train_fn=no_training, continue_fn=fake_continue)
    assert again.trained == [] and len(continued) == 2
    with pytest.raises(ConfigError, match="continue_from"):
        load_experiment(_write_exp(tmp_path, continue_from=str(tmp_path / "nowhere")))


def test_a_failed_run_is_recorded_and_the_grid_goes_on(tmp_path):
    exp = load_experiment(_write_exp(tmp_path, seeds=[0]))
    runs = expand_grid(exp)

    def flaky(cfg):
        Path(cfg.run.run_dir).mkdir(parents=True)
        if cfg.algorithm.advantage == "grpo_or" and cfg.learner.total_steps > 0:
            raise RuntimeError("boom")
        _fake_run(Path(cfg.run.run_dir), {"exact_match": 0.5}, 1, 0.0)

    out = run_grid(exp, runs, train_fn=flaky)
    assert out.failed == ["two_turn-grpo_or-seed0"] and len(out.trained) == len(runs) - 1
    assert run_status(tmp_path / "runs/two_turn-grpo_or-seed0") == "partial"  # redone next time


# ------------------------------------------------------------------------------------- report


def test_mean_std_and_curves_by_hand():
    m, s, n = mean_std([0.4, 0.5, 0.6])
    assert (round(m, 12), round(s, 12), n) == (0.5, 0.1, 3)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert mean_std([0.3]) == (0.3, 0.0, 1)
    assert math.isnan(mean_std([])[0])
    steps, mean, std = mean_curve([{1: 0.0, 2: 1.0, 3: 1.0}, {1: 1.0, 2: 1.0}], window=1)
    assert steps == [1, 2] and mean == [0.5, 1.0]  # step 3 is not logged by every seed
    assert std[0] == pytest.approx(math.sqrt(0.5)) and std[1] == 0.0
    _, mean, std = mean_curve([{1: 0.0, 2: 1.0}, {1: 1.0, 2: 1.0}], window=2)
    assert mean == [0.5, 0.75]  # smoothed: [0, 0.5] and [1, 1]
    assert std[1] == pytest.approx(math.sqrt(0.125))


def _table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """{estimator: cells} of the Markdown table under ``heading``."""
    part = text[text.index(heading):]
    rows = {}
    for line in part.splitlines()[1:]:
        if line.startswith("### ") or line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| estimator"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_report_tables_are_mean_and_sample_std_over_seeds(tmp_path):
    exp_path = _write_exp(tmp_path)
    _fake_grid(tmp_path)
    (tmp_path / "README.md").write_text(f"# x\n\nintro\n\n{README_START}\nold\n{README_END}\n\nafter\n")
    load_experiment(exp_path)  # the experiment file parses
    (tmp_path / "runs").mkdir(exist_ok=True)
    cmd = "turnrl experiment --config exp.yaml"
    (tmp_path / "runs/experiment.json").write_text(json.dumps({"sessions": [
        {"command": cmd, "wall_s": 1800.0, "trained": ["a"], "failed": []},
        {"command": cmd + " --report-only", "wall_s": 5.0, "trained": [], "failed": []},
        {"command": cmd, "wall_s": 600.0, "trained": ["b"], "failed": []}]}))
    assert cli_main(["experiment", "--config", str(exp_path), "--report-only"]) == 0
    text = (tmp_path / "docs/results.md").read_text()
    sampled = text[text.index("## Results: sampled"):text.index("## Results: greedy")]
    two = _table_rows(sampled, "### two_turn")
    # columns: tool-execution success, answer in search result, exact match, format score, seeds
    assert two["grpo_or"] == ["0.900 ± 0.000", "0.500 ± 0.361", "0.500 ± 0.100", "0.750 ± 0.250", "3/3"]
    # answer_in_result: deviations -0.3, -0.1, 0.4 -> sqrt(0.26 / 2) = 0.3606; format: sqrt(0.125 / 2) = 0.25
    assert two["mt_grpo"] == ["0.900 ± 0.141", "0.600 ± 0.141", "0.300 ± 0.000", "0.700 ± 0.141", "2/3"]
    assert two["warm_start"][2] == "0.100 ± 0.100"
    multi = _table_rows(sampled, "### multi_hop")
    assert multi["mt_grpo_k"] == ["0.700 ± 0.000", "0.300 ± 0.000", "0.250 ± 0.000", "0.500 ± 0.000", "1/3"]
    assert multi["warm_start"] == ["–", "–", "–", "–", "0/3"]
    greedy = _table_rows(text[text.index("## Results: greedy"):], "### two_turn")
    assert greedy["grpo_or"][2] == "0.600 ± 0.100" and greedy["mt_grpo"][0] == "–"
    assert "**Command:** `turnrl experiment --config exp.yaml`\n" in text  # sessions that trained nothing not shown
    assert "40.0 min elapsed over 2 invocation(s)" in text  # the session that trained nothing does not count
    assert "9 of 15 finished" in text
    png = tmp_path / "docs/results/two_turn_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](results/two_turn_curves.png)" in text
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# x\n\nintro\n\n" + README_START) and readme.endswith(README_END + "\n\nafter\n")
    assert "| grpo_or | 0.900 ± 0.000 | 0.500 ± 0.361" in readme and "\nold\n" not in readme


def test_regenerating_keeps_the_hand_written_discussion(tmp_path):
    exp = load_experiment(_write_exp(tmp_path, report={
        "path": str(tmp_path / "docs/results.md"), "figures_dir": str(tmp_path / "docs/results"), "readme": None}))
    runs = expand_grid(exp)
    _fake_grid(tmp_path, {k: v for k, v in FAKE.items() if k[0] == "two_turn"})
    path = write_report(exp, runs, {"sessions": []}, 2)
    first = path.read_text()
    placeholder = extract_section(first, DISCUSSION)
    assert placeholder and "To be written" in placeholder
    mine = (f"{DISCUSSION}\n\nMT-GRPO beats GRPO-OR on tool use here, not on exact match.\n\n"
            "### Caveats\n\nA 1M-parameter policy.\n\n")
    path.write_text(first.replace(placeholder, mine))
    _fake_grid(tmp_path, {k: v for k, v in FAKE.items() if k[0] == "multi_hop"})  # more runs finished
    second = write_report(exp, runs, {"sessions": []}, 2).read_text()
    assert extract_section(second, DISCUSSION) == mine
    assert "9 of 15 finished" in second and "| mt_grpo_k | 0.700 ± 0.000" in second
    assert write_report(exp, runs, {"sessions": []}, 2).read_text() == second  # idempotent


def test_dry_run_lists_runs_with_status(tmp_path, capsys):
    exp_path = _write_exp(tmp_path, seeds=[0])
    _fake_grid(tmp_path, {("two_turn", "grpo_or"): FAKE[("two_turn", "grpo_or")]})
    assert cli_main(["experiment", "--config", str(exp_path), "--dry-run", "--only", "two_turn-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["missing", "two_turn-warm_start-seed0"],
                                                ["done", "two_turn-grpo_or-seed0"],
                                                ["missing", "two_turn-mt_grpo-seed0"]]
    assert "algorithm.advantage=grpo_or" in lines[1] and f"--config {BASE}" in lines[1]
    assert cli_main(["experiment", "--config", str(exp_path), "--dry-run", "learner.lrr=0.1"]) == 2  # validated
    assert cli_main(["experiment", "--config", str(exp_path), "--dry-run", "run.seed=4"]) == 2  # a grid key
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------- one real tiny grid


# CI's 2-run miniature of the grid ([4/7]): 40 s here uncontended (load 0.3), actor start-up dominates
def test_tiny_real_grid_reuses_ray_and_cleans_up_its_actors(tmp_path, monkeypatch, ray_local):
    """The warm start and grpo_or (one step) in the test session's Ray: the runs finish, the report is written,
    the runs' actors are dead and their placement groups removed (so the next run gets the CPUs), a rerun trains
    nothing. With ``eval.greedy`` turned on afterwards, a rerun adds both runs' greedy evaluations from their saved
    policies (real actors, no training), and their sampled re-evaluations equal the runs' own."""
    import ray
    from ray._private import state as ray_state
    from ray.util import placement_group_table

    monkeypatch.chdir(tmp_path)
    common = {"model.path": str(REPO / "deploy/warmstart"), "data.dir": str(tmp_path / "data"),
              "data.num_people": 200, "data.num_cities": 20, "data.num_countries": 5,
              "learner.total_steps": 1, "algorithm.prompts_per_step": 2, "algorithm.group_size": 2,
              "learner.micro_batch_size": 4, "eval.num_questions": 4, "eval.greedy": False,
              "eval.before_training": False, "metrics.enabled": False}
    grid = dict(seeds=[0], warm_start_baseline=True,
                tasks={"two_turn": {"estimators": ["grpo_or"], "overrides": {"data.max_hops": 1, "env.max_turns": 2}}},
                report={"path": str(tmp_path / "results.md"), "figures_dir": str(tmp_path / "fig"), "readme": None})
    exp = load_experiment(_write_exp(tmp_path, common=common, **grid))
    runs = expand_grid(exp)
    names = ["two_turn-warm_start-seed0", "two_turn-grpo_or-seed0"]
    actors_before = set(ray_state.actors())
    out = run_grid(exp, runs)
    assert out.trained == names and not out.failed
    assert ray.is_initialized()  # not ours to shut down
    new = {a: v for a, v in ray_state.actors().items() if a not in actors_before}
    assert len(new) >= 10 and all(v["State"] == "DEAD" for v in new.values()), \
        {v["ActorClassName"]: v["State"] for v in new.values()}
    groups = [g for g in placement_group_table().values() if g["name"].startswith("turnrl-learner-two_turn-")]
    assert len(groups) == 2 and {g["state"] for g in groups} == {"REMOVED"}
    trained = json.loads((tmp_path / "runs/two_turn-grpo_or-seed0/eval.json").read_text())
    assert trained["steps"] == 1 and trained["trained"]["episodes"] == 4.0 and "trained_greedy" not in trained
    assert len((tmp_path / "runs/two_turn-grpo_or-seed0/metrics.jsonl").read_text().splitlines()) == 1
    path = write_report(exp, runs, {"sessions": []}, 2)
    rows = _table_rows(path.read_text(), "### two_turn")
    assert rows["grpo_or"][-1] == "1/1" and rows["grpo_or"][0] == f"{trained['trained']['tool_success']:.3f} ± 0.000"
    assert run_grid(exp, runs).skipped == names

    greedy_exp = load_experiment(_write_exp(tmp_path, common={**common, "eval.greedy": True}, **grid))
    again = run_grid(greedy_exp, expand_grid(greedy_exp))
    assert again.trained == [] and again.evaluated == names and not again.failed
    for name in names:
        ev = json.loads((tmp_path / "runs" / name / "eval.json").read_text())
        assert ev["trained_greedy"]["episodes"] == 4.0
        assert ev["evaluated_after_training"]["trained_greedy"]["max_diff_from_recorded"] == {"trained": 0.0}
    assert run_grid(greedy_exp, expand_grid(greedy_exp)).evaluated == []  # nothing left to add


def test_held_out_curves_give_areas_steps_to_target_and_paired_verdicts(tmp_path):
    """Runs with eval.every_steps curves: runs.csv holds every point, the report a per-task table and the
    paired comparisons against MT-GRPO (mt_grpo reaches 0.8 two evaluations earlier on every seed)."""
    import csv

    from learner.results import write_report

    exp = load_experiment(_write_exp(tmp_path))
    runs = expand_grid(exp)
    quick, slow = [0.2, 0.8, 0.9, 0.9], [0.2, 0.3, 0.5, 0.85]
    for seed in range(3):
        for est, air in (("mt_grpo", quick), ("grpo_or", slow)):
            d = tmp_path / "runs" / f"two_turn-{est}-seed{seed}"
            _fake_run(d, {"tool_success": 1.0, "answer_in_result": air[-1], "exact_match": 0.2 + 0.01 * seed,
                          "format": 1.0}, 4, 0.0)
            ev = json.loads((d / "eval.json").read_text())
            ev["curve"] = [{"step": 5 * i, "answer_in_result": a + 0.01 * seed, "exact_match": 0.05 * i,
                            "tool_success": 1.0, "format": 1.0} for i, a in enumerate(air)]
            ev["trained_greedy"] = {"exact_match": (0.5 if est == "mt_grpo" else 0.3) + 0.01 * seed}
            (d / "eval.json").write_text(json.dumps(ev))
    report = write_report(exp, runs, {}, 2).read_text()
    rows = list(csv.DictReader((tmp_path / "docs/results/runs.csv").open()))
    sampled = [r for r in rows if r["decoding"] == "sampled"]
    assert len(sampled) == 2 * 3 * 4 * 4  # estimators x seeds x evaluations x metrics
    greedy = [r for r in rows if r["decoding"] == "greedy"]  # the final greedy evaluation, at the last step
    assert len(greedy) == 2 * 3 and {(r["metric"], r["step"]) for r in greedy} == {("exact_match", "4")}
    mt_greedy = sorted(float(r["value"]) for r in greedy if r["estimator"] == "mt_grpo")
    assert mt_greedy == pytest.approx([0.5, 0.51, 0.52])  # the report's 0.510 [0.500, 0.520], from runs.csv
    assert {r["metric"] for r in rows} == {"tool_success", "answer_in_result", "exact_match", "format"}
    section = report.split("## Held-out learning", 1)[1].split("\n## ", 1)[0]
    assert "| mt_grpo |" in section and "| 5, 5, 5 |" in section and "| 15, 15, 15 |" in section
    assert "| never, never, never |" in section  # exact match 0.05 per evaluation: 0.15 at the end, below 0.2
    # areas by hand (trapezoids over steps 0, 5, 10, 15, divided by 15): quick 11.25/15 = 0.75, slow 6.625/15
    # = 0.4417; the per-seed offsets cancel in the pair
    assert "mt_grpo - grpo_or, area under answer_in_result: +0.308" in section
    assert "mt_grpo higher" in section.split("area under answer_in_result: +0.308", 1)[1].split("\n", 1)[0]
    assert "final exact match: +0.000" in section and "not distinguishable" in section
    # exact-match curves 0, 0.05, 0.1, 0.15 for both: the same area, 0.075, and a zero difference
    row = next(ln for ln in section.splitlines() if ln.startswith("| mt_grpo |"))
    assert row.split(" | ")[4] == "0.075 [0.075, 0.075]", row
    assert "mt_grpo - grpo_or, area under exact_match: +0.000 [+0.000, +0.000]" in section
    assert "| mt_grpo | 0.210 [0.200, 0.220] | 0.510 [0.500, 0.520] |" in section  # sampled, greedy
    fig = tmp_path / "docs/results/two_turn_held_out.png"  # held-out curves with steps-to-target bars
    assert fig.is_file() and fig.stat().st_size > 10_000 and "](results/two_turn_held_out.png)" in report
    greedy_pair = section.split("mt_grpo - grpo_or, final greedy exact match: ", 1)[1].split("\n", 1)[0]
    assert greedy_pair.startswith("+0.200 [+0.200, +0.200]") and greedy_pair.endswith("mt_grpo higher")


def test_a_variant_runs_an_estimator_with_its_own_settings(tmp_path):
    """variants: the seed's relevance factor (outcome_coef 0.2) as a row of its own beside mt_grpo."""
    import copy

    path = _write_exp(tmp_path, variants={"mt_grpo_l02": {"estimator": "mt_grpo",
                                                          "overrides": {"algorithm.outcome_coef": 0.2}}})
    tree = yaml.safe_load(path.read_text())
    tree["tasks"]["two_turn"]["estimators"].append("mt_grpo_l02")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    exp = load_experiment(path)
    runs = {r.name: r for r in expand_grid(exp)}
    cfgs = build_configs(exp, list(runs.values()))
    var, base = cfgs["two_turn-mt_grpo_l02-seed0"], cfgs["two_turn-mt_grpo-seed0"]
    assert (var.algorithm.advantage, var.algorithm.outcome_coef) == ("mt_grpo", 0.2)
    assert (base.algorithm.advantage, base.algorithm.outcome_coef) == ("mt_grpo", 1.0)
    assert runs["two_turn-mt_grpo_l02-seed0"].estimator == "mt_grpo_l02"  # the report's row name
    bad = dict(copy.deepcopy(tree), variants={"grpo_or_l02": {"estimator": "grpo_or",
                                                               "overrides": {"algorithm.outcome_coef": 0.2}}})
    bad["tasks"]["two_turn"]["estimators"] = ["grpo_or_l02"]
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(ConfigError, match=r"run two_turn-grpo_or_l02-seed0: .*`algorithm.outcome_coef`"):
        build_configs(load_experiment(path), expand_grid(load_experiment(path)))
    for variants, rule in (({"mt_grpo": {"estimator": "mt_grpo"}}, "differ from every estimator"),
                           ({"v": {"estimator": "nope"}}, r"`variants.v.estimator`")):
        path.write_text(yaml.safe_dump(dict(tree, variants=variants), sort_keys=False))
        with pytest.raises(ConfigError, match=rule):
            load_experiment(path)


def test_a_held_out_curve_without_step_0_starts_from_the_seeds_warm_start_run(tmp_path):
    from learner.results import held_out_section, load_records

    exp = load_experiment(_write_exp(tmp_path, seeds=[0]))
    runs = expand_grid(exp)
    _fake_run(tmp_path / "runs/two_turn-warm_start-seed0", {"answer_in_result": 0.2, "exact_match": 0.0}, 0, 0.0)
    d = tmp_path / "runs/two_turn-mt_grpo-seed0"
    _fake_run(d, {"answer_in_result": 1.0, "exact_match": 0.3}, 4, 0.0)
    ev = json.loads((d / "eval.json").read_text())
    ev["curve"] = [{"step": 10, "answer_in_result": 1.0}, {"step": 20, "answer_in_result": 1.0}]
    (d / "eval.json").write_text(json.dumps(ev))
    text = "\n".join(held_out_section(load_records(runs), {"two_turn": ["mt_grpo"]}))
    # points (0, 0.2), (10, 1.0), (20, 1.0): area (10 * 0.6 + 10 * 1.0) / 20 = 0.8; 0.8 first reached at step 10
    # –: no greedy evaluation; 0: no tokens logged
    assert "| mt_grpo | 0.300 [0.300, 0.300] | – | 0.800 [0.800, 0.800] | – | 10 | – | 0 | 1 |" in text  # –: no EM curve
    assert "greedy" not in text.split("|---|", 1)[1]  # and no greedy pair line


def test_the_second_search_section_reports_the_multi_hop_figures_with_intervals(tmp_path):
    """Runs whose evaluation covered two-hop questions get a table of those figures (warm start included);
    a task without them gets none. Two seeds: mean of the two values, bootstrap interval within them."""
    from learner.results import load_records, second_search_section

    exp = load_experiment(_write_exp(tmp_path, seeds=[0, 1]))
    runs = expand_grid(exp)
    hop = lambda air, two: {"multi_hop_answer_in_result": air, "multi_hop_two_searches": two,  # noqa: E731
                            "multi_hop_searches": 1 + two, "multi_hop_exact_match": air / 2,
                            "multi_hop_questions": 28.0}
    _fake_run(tmp_path / "runs/multi_hop-warm_start-seed0", {"answer_in_result": 0.2, **hop(0.0, 0.1)}, 0, 0.0)
    _fake_run(tmp_path / "runs/multi_hop-warm_start-seed1", {"answer_in_result": 0.2, **hop(0.1, 0.1)}, 0, 0.0)
    _fake_run(tmp_path / "runs/multi_hop-mt_grpo_k-seed0", {"answer_in_result": 0.5, **hop(0.4, 0.5)}, 4, 0.0)
    _fake_run(tmp_path / "runs/multi_hop-mt_grpo_k-seed1", {"answer_in_result": 0.5, **hop(0.4, 0.7)}, 4, 0.0)
    _fake_run(tmp_path / "runs/two_turn-mt_grpo-seed0", {"answer_in_result": 0.9}, 4, 0.0)
    text = "\n".join(second_search_section(load_records(runs), {"two_turn": ["mt_grpo"],
                                                                "multi_hop": ["warm_start", "mt_grpo_k"]}))
    assert "### multi_hop: the second search (28 held-out questions of two hops per run)" in text
    assert "two_turn" not in text
    rows = _table_rows(text, "### multi_hop")
    assert rows["warm_start"][0] == "0.050 [0.000, 0.100]" and rows["warm_start"][-1] == "2"
    assert rows["mt_grpo_k"][:3] == ["0.400 [0.400, 0.400]", "0.600 [0.500, 0.700]", "1.600 [1.500, 1.700]"]
    assert second_search_section(load_records(runs), {"two_turn": ["mt_grpo"]}) == []


def test_generated_tokens_counts_what_the_generators_sampled():
    from learner.results import generated_tokens

    # runs logged before rollout/generated_tokens: episodes of the step x their mean action tokens
    old = [{"rollout/episodes/total": 128, "rollout/action_tokens/mean": 50.0},
           {"rollout/episodes/total": 256, "rollout/action_tokens/mean": 40.0}]
    assert generated_tokens(old) == 128 * 50 + 128 * 40
    # tree runs log the sampled tokens (shared turns once), which win over the per-leaf mean
    tree = [{"rollout/episodes/total": 128, "rollout/action_tokens/mean": 50.0, "rollout/generated_tokens/total": 3000}]
    assert generated_tokens(tree) == 3000
    assert generated_tokens([]) is None
