"""``turnrl evaluate``: a finished run's saved policy re-evaluated through the real actors gives the run's own
figures, a missing greedy evaluation is added with where it came from, and the grid adds one to done runs
instead of training them again."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from common.modeling import check_model_dir
from learner.cli import main as cli_main
from learner.evaluate import PROVENANCE, evaluate_run, max_difference
from learner.experiment import build_configs, expand_grid, lacks_greedy, load_experiment, run_grid
from learner.results import after_training_line, load_records, write_report

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "deploy/configs/local.yaml")


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory) -> Path:
    """Two steps of mt_grpo with the sampled and greedy evaluations at the end (the run's own)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    run_dir = tmp / "run"
    code = cli_main(["train", "--config", BASE, "--run-dir", str(run_dir), f"model.path={REPO / 'deploy/warmstart'}",
                     f"data.dir={tmp / 'data'}", "data.num_people=200", "data.num_cities=20", "data.num_countries=5",
                     "algorithm.prompts_per_step=2", "algorithm.group_size=2", "learner.micro_batch_size=4",
                     "learner.total_steps=2", "learner.lr=0.01", "eval.num_questions=6", "eval.greedy=true",
                     "eval.before_training=false", "metrics.enabled=false", "checkpoint.every_steps=0"])
    assert code == 0
    return run_dir


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_saved_policy_is_a_model_directory_with_its_tokenizer(finished_run):
    check_model_dir(finished_run / "policy")  # config, safetensors and tokenizer files all there
    assert (finished_run / "policy/tokenizer.json").is_file()


def test_re_evaluating_the_saved_policy_reproduces_the_runs_own_figures(finished_run):
    own = json.loads((finished_run / "eval.json").read_text())
    code, out, err = _cli(["evaluate", str(finished_run)])
    assert code == 0, err[-2000:]
    assert out.count("the same as the run's own") == 2, out  # sampled and greedy
    after = json.loads((finished_run / "eval.json").read_text())
    assert after == own  # nothing it held was rewritten, nothing added


def test_a_missing_greedy_evaluation_is_added_with_its_provenance(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    own = json.loads((run / "eval.json").read_text())
    greedy = own.pop("trained_greedy")  # as if the run trained with eval.greedy: false
    (run / "eval.json").write_text(json.dumps(own))
    res = evaluate_run(run, ("sampled", "greedy"), command="test")
    assert res.added == ["trained_greedy"] and res.written and res.max_diff == {"trained": 0.0}
    after = json.loads((run / "eval.json").read_text())
    assert max_difference(after["trained_greedy"], greedy) == 0.0 and after["trained_greedy"]["episodes"] == 6.0
    prov = after[PROVENANCE]["trained_greedy"]
    assert prov["from"] == "policy/" and prov["command"] == "test" and prov["max_diff_from_recorded"] == {"trained": 0.0}
    assert after["trained"] == own["trained"]


def test_no_write_leaves_eval_json_alone(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    own = json.loads((run / "eval.json").read_text())
    del own["trained_greedy"]
    (run / "eval.json").write_text(json.dumps(own))
    code, out, err = _cli(["evaluate", str(run), "--mode", "greedy", "--no-write"])
    assert code == 0, err[-2000:]
    assert "eval.json lacks it; not written" in out
    assert json.loads((run / "eval.json").read_text()) == own


def test_bad_run_directories_fail_naming_what_is_missing(tmp_path, finished_run):
    code, _, err = _cli(["evaluate", str(tmp_path)])
    assert code == 2 and "config.yaml" in err and "does not exist" in err
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("*.safetensors"))
    code, _, err = _cli(["evaluate", str(run)])
    assert code == 2 and "holds no *.safetensors" in err
    with pytest.raises(ValueError, match="each must be one of"):
        evaluate_run(finished_run, ("beam",))
    tensor_run = tmp_path / "arm"
    tensor_run.mkdir()
    shutil.copy(REPO / "deploy/configs/arm.yaml", tensor_run / "config.yaml")
    code, _, err = _cli(["evaluate", str(tensor_run)])
    assert code == 2 and "tensor-agent run" in err


# ------------------------------------------------------------------------------ the grid's side


def _exp(tmp_path: Path, greedy: bool) -> Path:
    tree = {"name": "t", "base_config": BASE, "out_dir": str(tmp_path / "runs"), "seeds": [0, 1],
            "warm_start_baseline": True, "common": {"learner.total_steps": 3, "eval.greedy": greedy},
            "tasks": {"two_turn": {"estimators": ["mt_grpo"], "overrides": {"data.max_hops": 1}}},
            "report": {"path": str(tmp_path / "results.md"), "figures_dir": str(tmp_path / "fig"), "readme": None}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _done(run_dir: Path, greedy: bool) -> None:
    run_dir.mkdir(parents=True)
    ev = {"trained": {"exact_match": 0.2, "tool_success": 0.9, "answer_in_result": 0.5, "format": 0.2}, "steps": 3,
          "wall_time_s": 10.0}
    if greedy:
        ev["trained_greedy"] = dict(ev["trained"])
    (run_dir / "eval.json").write_text(json.dumps(ev))


def test_the_grid_evaluates_done_runs_that_lack_the_greedy_evaluation_instead_of_training_them(tmp_path):
    exp = load_experiment(_exp(tmp_path, greedy=True))
    runs = expand_grid(exp)
    for spec in runs:  # every run done; seed 1's mt_grpo already has its greedy evaluation
        _done(spec.run_dir, greedy=spec.name == "two_turn-mt_grpo-seed1")
    evaluated = []

    def fake_evaluate(run_dir: Path) -> None:  # what learner.evaluate.evaluate_run adds
        ev = json.loads((run_dir / "eval.json").read_text())
        ev["trained_greedy"] = {**ev["trained"], "exact_match": 0.4}
        ev[PROVENANCE] = {"trained_greedy": {"from": "policy/", "max_diff_from_recorded": {"trained": 0.0}}}
        (run_dir / "eval.json").write_text(json.dumps(ev))
        evaluated.append(run_dir.name)

    def no_training(cfg):
        raise AssertionError(f"{cfg.run.run_dir} is done and must not be trained again")

    out = run_grid(exp, runs, train_fn=no_training, evaluate_fn=fake_evaluate)
    expected = [r.name for r in runs if r.name != "two_turn-mt_grpo-seed1"]
    assert out.evaluated == evaluated == expected and out.trained == [] and len(out.skipped) == len(runs)
    configs = build_configs(exp, runs)
    assert not any(lacks_greedy(configs[r.name], r.run_dir) for r in runs)  # nothing left to add
    again = run_grid(exp, runs, train_fn=no_training, evaluate_fn=fake_evaluate)
    assert again.evaluated == []
    records = load_records(runs)
    line = after_training_line(records)
    assert line.startswith("The greedy evaluations of 3 run(s) (two_turn 3) were taken after training")
    assert "by at most 0.000 (3 of 3 checked)" in line
    text = write_report(exp, runs, {"sessions": []}, 2).read_text()
    assert line in text


def test_a_grid_without_eval_greedy_evaluates_nothing(tmp_path):
    exp = load_experiment(_exp(tmp_path, greedy=False))
    runs = expand_grid(exp)
    for spec in runs:
        _done(spec.run_dir, greedy=False)

    def never(run_dir: Path) -> None:
        raise AssertionError("eval.greedy is false: nothing to add")

    out = run_grid(exp, runs, train_fn=lambda cfg: None, evaluate_fn=never)
    assert out.evaluated == [] and len(out.skipped) == len(runs)
    assert after_training_line(load_records(runs)) is None


def test_a_run_that_cannot_be_evaluated_stays_done_and_the_grid_goes_on(tmp_path):
    exp = load_experiment(_exp(tmp_path, greedy=True))
    runs = expand_grid(exp)
    for spec in runs:
        _done(spec.run_dir, greedy=False)
    out = run_grid(exp, runs, train_fn=lambda cfg: None)  # the real evaluate: these runs saved no config or policy
    assert out.evaluated == [] and out.trained == [] and len(out.skipped) == len(runs)
    assert all(json.loads((r.run_dir / "eval.json").read_text()).keys() == {"trained", "steps", "wall_time_s"}
               for r in runs)
