"""``turnrl experiment``: the credit-assignment comparison as one resumable grid of training runs.

    for seed in seeds:                       (seed-major: an interrupted grid still holds whole seeds)
        for task in tasks:                   (two_turn, multi_hop, ...)
            for estimator in [warm_start?] + task.estimators:
                run = base config + common overrides + task overrides + CLI overrides
                      + algorithm.advantage=<estimator> run.seed=<seed> run.run_dir=<out>/<task>-<estimator>-seed<seed>
                skip it if <run_dir>/eval.json exists; redo it from scratch if the directory is partial
    write docs/results.md (learner.results) from every finished run

``warm_start`` is a pseudo-estimator: the same run with ``learner.total_steps=0``, so its
``trained`` evaluation is the untrained starting policy, on the same held-out questions and
sampling seed as the trained runs of that seed.

Runs execute one after another in this process, in one Ray session: ``learner.driver.train``
starts Ray on the first run and finds it running afterwards; each run kills its own actors and
frees its placement group when it ends (``Trainer.close``). That saves the Ray start-up and the
Python imports of a subprocess per run. A run that raises is logged and recorded as failed; Ray
is then restarted (when this process started it) so one broken run cannot poison the next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

import yaml

from common.config import Config, ConfigError, _build, load_config
from common.config_agent import AgentConfig, config_kind, load_agent_config
from learner.credit import ESTIMATORS
from learner.driver import train
from learner.estimator_config import check_estimator_config
from learner.evaluation import GREEDY_KEY

log = logging.getLogger(__name__)

WARM_START = "warm_start"  # pseudo-estimator: evaluate the starting policy (learner.total_steps=0)
ESTIMATOR_KEY = "algorithm.advantage"  # the run-config field that selects the credit estimator
GRID_KEYS = (ESTIMATOR_KEY, "run.seed", "run.name", "run.run_dir")  # set by the grid, never by overrides
STATE_FILE = "experiment.json"  # <out_dir>/experiment.json: the commands and sessions that built the grid
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class TaskConfig:
    estimators: list[str] = field(default_factory=list)  # credit estimators trained on this task
    overrides: dict[str, Any] = field(default_factory=dict)  # run-config overrides (dotted keys) for this task


@dataclass
class VariantConfig:
    estimator: str = ""  # the registered estimator this variant runs
    overrides: dict[str, Any] = field(default_factory=dict)  # its run-config overrides (e.g. algorithm.outcome_coef)


@dataclass
class ReportConfig:
    path: str = "docs/results.md"  # the generated report (its "## Discussion" section is kept on rewrite)
    figures_dir: str = "docs/results"  # learning-curve PNGs, one per task
    readme: str | None = "README.md"  # file whose <!-- results:start/end --> block gets the headline table (null: none)
    smooth: int = 3  # moving-average window (steps) applied to each seed's curve before averaging

    def validate(self, p: str) -> None:
        if self.smooth < 1:
            raise ConfigError(f"config field `{p}.smooth` = {self.smooth!r}: must be >= 1")


@dataclass
class ExperimentConfig:
    name: str = "credit"  # prefix of every run name (run.name)
    base_config: str = "deploy/configs/local.yaml"  # run config every run starts from
    out_dir: str = "runs/credit-comparison"  # run directories: <out_dir>/<task>-<estimator>-seed<seed>
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # run.seed of the repeats
    warm_start_baseline: bool = True  # also evaluate the untrained policy per task and seed
    continue_from: str | None = None  # a grid's out_dir: a run missing here but done there is copied, then continued to this grid's learner.total_steps from its last checkpoint
    common: dict[str, Any] = field(default_factory=dict)  # run-config overrides (dotted keys) for every run
    tasks: dict[str, TaskConfig] = field(default_factory=dict)  # task name -> estimators and task overrides
    variants: dict[str, VariantConfig] = field(default_factory=dict)  # name -> an estimator with its own settings
    report: ReportConfig = field(default_factory=ReportConfig)  # where the results go

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"config field `name` = {self.name!r}: must match {_NAME.pattern}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config field `seeds` = {self.seeds!r}: must be a non-empty list without repeats")
        if not self.tasks:
            raise ConfigError("config field `tasks` = {}: name at least one task")
        _check_overrides(self.common, "common")
        for name, var in self.variants.items():
            if not _NAME.match(name) or name in ESTIMATORS or name == WARM_START:
                raise ConfigError(f"config field `variants.{name}`: a variant's name must match {_NAME.pattern} "
                                  "and differ from every estimator's")
            if var.estimator not in ESTIMATORS:
                raise ConfigError(f"config field `variants.{name}.estimator` = {var.estimator!r}: must be one of "
                                  f"{sorted(ESTIMATORS)}")
            _check_overrides(var.overrides, f"variants.{name}.overrides")
        for task, spec in self.tasks.items():
            if not _NAME.match(task):
                raise ConfigError(f"config field `tasks.{task}`: task names must match {_NAME.pattern}")
            if not spec.estimators or len(set(spec.estimators)) != len(spec.estimators):
                raise ConfigError(f"config field `tasks.{task}.estimators` = {spec.estimators!r}: "
                                  "must be a non-empty list without repeats")
            for est in spec.estimators:
                if est not in ESTIMATORS and est not in self.variants:
                    raise ConfigError(f"config field `tasks.{task}.estimators` holds {est!r}: must be one of "
                                      f"{sorted(ESTIMATORS)} or a name under `variants`")
            _check_overrides(spec.overrides, f"tasks.{task}.overrides")
        self.report.validate("report")
        if self.continue_from is not None and not Path(self.continue_from).is_dir():
            raise ConfigError(f"config field `continue_from` = {self.continue_from!r}: must be an existing grid "
                              "directory (the out_dir of the grid whose runs are continued)")
        if Path(self.base_config).is_file() and config_kind(self.base_config) == "tensor":
            if self.warm_start_baseline:
                raise ConfigError("config field `warm_start_baseline` = true: a tensor-agent grid evaluates the initial "
                                  "policy at step 0 of every run's curve; set it to false")
            if self.report.readme is not None or self.report.smooth != ReportConfig().smooth:
                raise ConfigError("config fields `report.readme` / `report.smooth` apply to LLM grids only (a "
                                  "tensor-agent grid writes the '## Beyond LLMs' section of report.path); set "
                                  "readme: null and leave smooth out")


def _check_overrides(overrides: Any, where: str) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"config field `{where}` = {overrides!r}: must be a mapping of dotted keys to values")
    for key in overrides:
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"config field `{where}` has key {key!r}: must be a dotted run-config key "
                              "such as learner.total_steps")
        if key in GRID_KEYS:
            raise ConfigError(f"config field `{where}` sets `{key}`: the grid sets {', '.join(GRID_KEYS)}")


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load and validate an experiment YAML; errors name the field, the value and the rule."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment config {str(p)!r} does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"experiment config {str(p)!r} must hold a YAML mapping at the top level")
    tasks = tree.pop("tasks", {}) or {}
    if not isinstance(tasks, dict):
        raise ConfigError(f"config field `tasks` = {tasks!r}: must be a mapping of task name to task")
    variants = tree.pop("variants", {}) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"config field `variants` = {variants!r}: must map names to {{estimator, overrides}}")
    exp = _build(ExperimentConfig, tree, "")
    for name, spec in tasks.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"config field `tasks.{name}` = {spec!r}: must be a mapping with estimators, overrides")
    exp.tasks = {str(name): _build(TaskConfig, spec, f"tasks.{name}") for name, spec in tasks.items()}
    exp.variants = {str(name): _build(VariantConfig, spec, f"variants.{name}") for name, spec in variants.items()}
    exp.validate()
    return exp


# ---------------------------------------------------------------------------------------------
# The grid (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: which task, estimator and seed, where it lives, and its overrides."""

    task: str
    estimator: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  # dotted key=value strings for load_config(base_config, overrides)

    @property
    def name(self) -> str:
        return self.run_dir.name


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``{"learner.lr": 0.001, "run.name": "a"}`` -> ``["learner.lr=0.001", "run.name=a"]``.

    Values are written as JSON (valid YAML for ``load_config``), strings bare when YAML reads them back
    unchanged.
    """
    out = []
    for key, value in overrides.items():
        text = json.dumps(value)
        if isinstance(value, str) and value and yaml.safe_load(value) == value:
            text = value
        out.append(f"{key}={text}")
    return out


def merge_args(*groups: list[str]) -> list[str]:
    """Concatenate ``key=value`` lists, keeping only the last value of each key (in its last position)."""
    last = {item.split("=", 1)[0].strip(): i for i, item in enumerate(a for g in groups for a in g)}
    flat = [a for g in groups for a in g]
    return [a for i, a in enumerate(flat) if last[a.split("=", 1)[0].strip()] == i]


def expand_grid(exp: ExperimentConfig, *, out_dir: str | Path | None = None,
                extra: list[str] | tuple[str, ...] = ()) -> list[RunSpec]:
    """Every run of the experiment, seed-major, with its full override list.

    Override order (later wins): ``common``, the task's ``overrides``, a variant's ``overrides``, ``extra``
    (command line),
    then the grid's own keys (:data:`GRID_KEYS`; ``warm_start`` adds ``learner.total_steps=0``).
    """
    for item in extra:
        key = item.split("=", 1)[0].strip()
        if key in GRID_KEYS:
            raise ConfigError(f"config override {item!r}: the grid sets {', '.join(GRID_KEYS)}")
    root = Path(out_dir if out_dir is not None else exp.out_dir)
    runs = []
    for seed in exp.seeds:
        for task, spec in exp.tasks.items():
            estimators = ([WARM_START] if exp.warm_start_baseline else []) + list(spec.estimators)
            for est in estimators:
                run_dir = root / f"{task}-{est}-seed{seed}"
                grid = {"run.seed": seed, "run.name": f"{exp.name}-{run_dir.name}", "run.run_dir": str(run_dir)}
                variant = exp.variants.get(est)
                if est == WARM_START:
                    grid["learner.total_steps"] = 0
                else:
                    grid[ESTIMATOR_KEY] = variant.estimator if variant else est
                args = merge_args(override_args(exp.common), override_args(spec.overrides),
                                  override_args(variant.overrides if variant else {}), list(extra),
                                  override_args(grid))
                runs.append(RunSpec(task, est, seed, run_dir, tuple(args)))
    return runs


def select_runs(runs: list[RunSpec], patterns: list[str] | None) -> list[RunSpec]:
    """Runs whose name (``<task>-<estimator>-seed<seed>``) matches any glob in ``patterns`` (all if none)."""
    if not patterns:
        return list(runs)
    chosen = [r for r in runs if any(fnmatch(r.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"--only {patterns!r} matches no run; runs are named like {runs[0].name!r}")
    return chosen


def finished_eval(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's ``eval.json`` (it holds a ``trained`` evaluation), else None."""
    try:
        ev = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return ev if isinstance(ev, dict) and "trained" in ev else None


def run_status(run_dir: Path) -> str:
    """``done`` (eval.json holds a ``trained`` evaluation), ``partial`` (directory without it) or ``missing``."""
    if finished_eval(run_dir) is not None:
        return "done"
    return "partial" if run_dir.exists() else "missing"


def config_drift(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between a finished run's config.yaml and the grid's config now."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b, path = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_drift(a, b, f"{path}.")
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one invocation did: run names trained, skipped (already done) and failed."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)  # done runs given the greedy evaluation they lacked
    wall_s: float = 0.0
    evaluate_s: float = 0.0  # of wall_s, the time spent on those evaluations


def train_any(cfg: Config | AgentConfig) -> Any:
    """``learner.driver.train`` for an LLM run, ``learner.tensor_driver.train_agent`` for a tensor agent."""
    if isinstance(cfg, AgentConfig):
        from learner.tensor_driver import train_agent

        return train_agent(cfg)
    return train(cfg)


def lacks_greedy(cfg: Config | AgentConfig, run_dir: Path) -> bool:
    """A done LLM run whose grid config asks for ``eval.greedy`` but whose eval.json has no greedy evaluation
    (it trained with ``eval.greedy: false``): ``turnrl evaluate`` can add it from the saved policy."""
    ev = finished_eval(run_dir)
    return isinstance(cfg, Config) and cfg.eval.greedy and ev is not None and GREEDY_KEY not in ev


def continuable(cfg: Config | AgentConfig, run_dir: Path) -> bool:
    """A done LLM run trained for fewer steps than ``learner.total_steps`` now, with a checkpoint at its last step:
    resuming it there (``turnrl train --resume``) continues it to the grid's budget (the learning rate is constant
    after warmup, so that is the longer run)."""
    from learner.checkpoint import checkpoint_root, latest_checkpoint

    ev = finished_eval(run_dir)
    if not isinstance(cfg, Config) or ev is None or int(ev.get("steps") or 0) >= cfg.learner.total_steps:
        return False
    last = latest_checkpoint(checkpoint_root(cfg, run_dir))
    return last is not None and last.name == f"step_{int(ev['steps']):06d}"


def continue_run(cfg: Config, run_dir: Path) -> None:
    """Resume a done run from its last checkpoint to ``cfg.learner.total_steps``; its ``wall_time_s`` then counts
    both parts, and ``continued_from_step`` says where the second began."""
    old = finished_eval(run_dir) or {}
    train(cfg, resume=run_dir)
    ev = json.loads((run_dir / "eval.json").read_text())
    ev["wall_time_s"] = float(ev.get("wall_time_s", 0.0)) + float(old.get("wall_time_s", 0.0))
    ev["continued_from_step"] = int(old.get("steps") or 0)
    (run_dir / "eval.json").write_text(json.dumps(ev, indent=2))


def evaluate_greedy(run_dir: Path) -> Any:
    """The greedy evaluation of a done run's saved policy, added to its eval.json (``learner.evaluate``), with a
    sampled one that checks the saved policy against the run's own sampled evaluation (recorded beside it)."""
    from learner.evaluate import evaluate_run

    return evaluate_run(run_dir, ("sampled", "greedy"), command="turnrl experiment (eval.greedy: true)")


def run_grid(exp: ExperimentConfig, runs: list[RunSpec], *,
             train_fn: Callable[[Config], Any] | None = None,
             evaluate_fn: Callable[[Path], Any] | None = None,
             continue_fn: Callable[[Config, Path], Any] | None = None) -> Outcome:
    """Train every run of ``runs`` that is not done, one after another in this process.

    Every run's config is built and validated before the first one starts. A partial run
    directory is deleted and the run redone; a done run is skipped (with a warning when its saved
    config differs from what the grid would use now), except that a done run lacking the greedy
    evaluation the grid now asks for (``eval.greedy``) gets it from its saved policy, without training
    again (``evaluate_fn``, default :func:`evaluate_greedy`). With ``continue_from``, a missing run whose
    counterpart there is done is copied here first; a done run trained for fewer steps than the grid's budget
    is continued from its last checkpoint (``continue_fn``, default :func:`continue_run`). Ray is shut down at
    the end, and after a failed run, only if this call started it.
    """
    import ray

    train_fn = train_any if train_fn is None else train_fn
    evaluate_fn = evaluate_greedy if evaluate_fn is None else evaluate_fn
    continue_fn = continue_run if continue_fn is None else continue_fn
    configs = build_configs(exp, runs)
    owns_ray = not ray.is_initialized()
    out, t_start = Outcome(), time.time()
    todo = [s for s in runs if run_status(s.run_dir) != "done" or continuable(configs[s.name], s.run_dir)]
    log.info("experiment: %d run(s) selected, %d done already, %d to train", len(runs), len(runs) - len(todo),
             len(todo))
    try:
        for spec in runs:
            cfg = configs[spec.name]
            status = run_status(spec.run_dir)
            source = Path(exp.continue_from) / spec.name if exp.continue_from else None
            if status == "missing" and source is not None and run_status(source) == "done":
                log.info("run %s: copied from %s (continue_from)", spec.name, source)
                shutil.copytree(source, spec.run_dir, symlinks=True)
                status = "done"
            resume = status == "done" and continuable(cfg, spec.run_dir)
            if status == "done" and not resume:
                if lacks_greedy(cfg, spec.run_dir):
                    t0 = time.time()
                    log.info("run %s: done; adding the greedy evaluation it lacks from its saved policy", spec.name)
                    try:
                        evaluate_fn(spec.run_dir)
                        out.evaluated.append(spec.name)
                    except Exception as e:  # noqa: BLE001 - the run stays done; its greedy cell stays empty
                        log.warning("run %s: could not evaluate its saved policy (%s); it keeps no greedy "
                                    "evaluation", spec.name, e)
                    out.evaluate_s += time.time() - t0
                _warn_drift(spec, cfg)
                out.skipped.append(spec.name)
                continue
            if status == "partial":
                log.info("run %s: partial directory, redoing it from scratch", spec.name)
                shutil.rmtree(spec.run_dir)
            left = len(todo) - len(out.trained) - len(out.failed)
            per_run = (time.time() - t_start) / max(1, len(out.trained) + len(out.failed))
            eta = f", about {per_run * left / 60:.0f} min left" if out.trained or out.failed else ""
            how = (f"continuing it from step {finished_eval(spec.run_dir).get('steps')} to {cfg.learner.total_steps}, "
                   "from its last checkpoint; " if resume else "")
            log.info("run %s (%s%d of %d to train%s)", spec.name, how, len(todo) - left + 1, len(todo), eta)
            t0 = time.time()
            try:
                continue_fn(cfg, spec.run_dir) if resume else train_fn(cfg)
            except Exception:  # noqa: BLE001 - record it, keep the grid going; a rerun redoes (or continues) it
                log.exception("run %s failed after %.0f s; the next invocation redoes it (a continued run goes on "
                              "from its newest checkpoint)", spec.name, time.time() - t0)
                out.failed.append(spec.name)
                if owns_ray and ray.is_initialized():
                    ray.shutdown()  # the next run starts a clean Ray session
                continue
            out.trained.append(spec.name)
            log.info("run %s finished in %.0f s", spec.name, time.time() - t0)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        out.wall_s = time.time() - t_start
    return out


def build_configs(exp: ExperimentConfig, runs: list[RunSpec]) -> dict[str, Config | AgentConfig]:
    """Every run's validated config by run name; a ``ConfigError`` names the run, the field and the rule.
    A ``kind: tensor`` base config makes every run a tensor-agent run (``common.config_agent``)."""
    configs = {}
    load = load_agent_config if config_kind(exp.base_config) == "tensor" else load_config
    for spec in runs:
        try:
            configs[spec.name] = load(exp.base_config, list(spec.overrides))
            check_estimator_config(configs[spec.name].algorithm)
        except ConfigError as e:
            raise ConfigError(f"run {spec.name}: {e}") from e
    return configs


def saved_config(run_dir: Path, like: Config | AgentConfig) -> dict[str, Any] | None:
    """A run's ``config.yaml`` loaded as a config now (keys added since the run take their defaults, which keep
    the old behaviour), as a dict; the raw YAML if it no longer loads; None if it is missing or unreadable."""
    path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    try:
        return (load_agent_config if isinstance(like, AgentConfig) else load_config)(str(path), []).to_dict()
    except ConfigError:
        return raw


def _warn_drift(spec: RunSpec, cfg: Config | AgentConfig) -> None:
    saved = saved_config(spec.run_dir, cfg)
    if saved is None:
        return
    diffs = config_drift(saved, cfg.to_dict())
    diffs = [d for d in diffs if not d.startswith("run.run_dir:")]  # the grid's own key: the run is where it says
    if GREEDY_KEY in (finished_eval(spec.run_dir) or {}):  # evaluated greedily after training: nothing missing
        diffs = [d for d in diffs if not d.startswith("eval.greedy:")]
    if diffs:
        log.warning("run %s is done but was trained with a different config (delete it to redo): %s",
                    spec.name, "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else ""))


def record_session(out_dir: Path, command: str, outcome: Outcome, started: float) -> dict[str, Any]:
    """Append this invocation to ``<out_dir>/experiment.json``; return the whole state."""
    path = out_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"sessions": []}
    state["sessions"].append({"command": command, "started": started, "wall_s": outcome.wall_s,
                              **{k: v for k, v in dataclasses.asdict(outcome).items() if k != "wall_s"}})
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))
    return state


def read_state(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {"sessions": []}
