"""``turnrl evaluate``: a finished run's saved policy on the run's own held-out questions, after training.

    cfg       <- RUN_DIR/config.yaml (what the run trained with)
    actors    <- generators from model.path (the starting model: tokenizer and architecture),
                 env workers over the run's index, one rollout worker; no learner, queue or judge
    weights   <- RUN_DIR/policy/*.safetensors pushed to the generators (the in-run weight-sync path)
    evaluate  <- the same questions, seeds and sampling as the run's own evaluations
                 (``learner.trainer.evaluate_policy``): sampled -> ``trained``, greedy -> ``trained_greedy``
    record    <- an evaluation eval.json lacks is added (with where it came from); one it holds is
                 compared, never overwritten

So a run trained with ``eval.greedy: false`` gets its greedy evaluation without training again, and a
sampled re-evaluation checks that the saved policy is the one the run evaluated (same figures).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError, load_config
from common.config_agent import config_kind
from common.modeling import check_model_dir, check_safetensors
from learner.evaluation import GREEDY_KEY, SAMPLED_KEY

log = logging.getLogger(__name__)

MODES = {"sampled": (SAMPLED_KEY, False), "greedy": (GREEDY_KEY, True)}  # mode -> (eval.json key, greedy)
SAME = 1e-9  # evaluations this close count as the same figures
PROVENANCE = "evaluated_after_training"  # eval.json: key -> how an evaluation added by this module was taken


@dataclass
class Evaluated:
    """What one run's evaluation found: per eval.json key, the figures; which keys were added to eval.json,
    and for the keys it held already, the largest difference from the recorded figures."""

    run_dir: Path
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # keys eval.json lacked (written to it when ``written``)
    max_diff: dict[str, float] = field(default_factory=dict)
    written: bool = False


def policy_state(run_dir: Path) -> dict[str, Any]:
    """The trained weights in ``RUN_DIR/policy`` (every ``*.safetensors`` shard; nothing is unpickled)."""
    from safetensors.torch import load_file

    policy = run_dir / "policy"
    shards = sorted(policy.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{str(policy)!r} holds no *.safetensors: the run did not finish (its policy is "
                                "saved at the end of training)")
    state: dict[str, Any] = {}
    for shard in shards:
        check_safetensors(shard)
        state.update(load_file(str(shard)))
    return state


def run_config(run_dir: Path) -> Config:
    """The config a run trained with (``RUN_DIR/config.yaml``), checked like a training config's model."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: RUN_DIR must be a run directory of `turnrl train`")
    if config_kind(str(path)) == "tensor":
        raise ConfigError(f"{str(path)!r} is a tensor-agent run (kind: tensor): its eval.json holds a greedy "
                          "evaluation already; `turnrl evaluate` re-evaluates LLM runs")
    cfg = load_config(str(path), [])
    check_model_dir(cfg.model.path)
    return cfg


class RunEvaluator:
    """The evaluation actors of one run config (generators, env workers, a rollout worker); Ray plumbing here."""

    def __init__(self, cfg: Config):
        import ray

        from actors.generator import Generator
        from actors.rollout import RolloutWorker
        from env_workers.prepare import prepare_data
        from learner.trainer import generator_kwargs, held_out_questions, make_env_workers, rollout_kwargs

        self.cfg = cfg
        data = prepare_data(cfg.data)
        self.questions = held_out_questions(cfg, data)
        model_path = str(Path(cfg.model.path).resolve())
        g = cfg.generators
        self.generators = [ray.remote(Generator).options(num_cpus=g.num_cpus, num_gpus=g.num_gpus).remote(
            model_path, **generator_kwargs(cfg)) for _ in range(g.num)]
        self.env_workers = make_env_workers(cfg, data)
        self.rollout = ray.remote(RolloutWorker).options(num_cpus=0).remote(
            model_path, self.generators, self.env_workers, None, run_id="evaluate",
            env_restart_wait_s=cfg.faults.restart_wait_s, **rollout_kwargs(cfg))

    def load(self, state: dict[str, Any], version: int) -> None:
        """Push the trained weights to every generator, as the run's weight sync did."""
        import ray

        ref = ray.put(state)
        ray.get([g.update_weights.remote(version, [ref]) for g in self.generators])

    def evaluate(self, label: str, *, greedy: bool) -> dict[str, float]:
        from learner.trainer import evaluate_policy

        return evaluate_policy(self.cfg, self.rollout, self.questions, label, greedy=greedy)

    def close(self) -> None:
        from learner.cluster import kill_actors

        kill_actors([self.rollout, *self.generators, *self.env_workers])


def max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest absolute difference over the figures both evaluations hold (0 if none)."""
    diffs = [abs(float(a[k]) - float(b[k])) for k in a.keys() & b.keys()
             if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))]
    return max(diffs, default=0.0)


def evaluate_run(run_dir: str | Path, modes: tuple[str, ...] = ("sampled", "greedy"), *, write: bool = True,
                 command: str = "turnrl evaluate") -> Evaluated:
    """Evaluate ``RUN_DIR/policy`` in each mode of ``modes`` (``sampled``, ``greedy``) on the run's held-out
    questions; add to ``eval.json`` what it lacks (``write``), compare what it holds. Starts Ray locally (or
    joins ``ray.address``) when it is not running; the actors are killed at the end."""
    from learner.driver import start_ray

    run_dir = Path(run_dir)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"evaluation modes {list(modes)!r}: each must be one of {sorted(MODES)}")
    cfg = run_config(run_dir)
    state = policy_state(run_dir)
    eval_path = run_dir / "eval.json"
    recorded = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    if write and recorded is None:
        raise FileNotFoundError(f"{str(eval_path)!r} does not exist: the run did not finish (evaluate it with "
                                "--no-write to only print the figures)")
    start_ray(cfg)
    out = Evaluated(run_dir)
    evaluator = RunEvaluator(cfg)
    try:
        evaluator.load(state, int((recorded or {}).get("steps", cfg.learner.total_steps)))
        for mode in modes:
            key, greedy = MODES[mode]
            out.results[key] = evaluator.evaluate(f"{run_dir.name} {mode}", greedy=greedy)
    finally:
        evaluator.close()
    for key, got in out.results.items():
        if recorded is not None and isinstance(recorded.get(key), dict):
            out.max_diff[key] = max_difference(recorded[key], got)
            if out.max_diff[key] > SAME:
                log.warning("run %s: the saved policy's %s differs from the run's own by up to %.3f (not overwritten)",
                            run_dir.name, key, out.max_diff[key])
        elif recorded is not None:
            out.added.append(key)
    for key in out.added:  # with the re-evaluations that checked the saved policy against the run's own
        recorded[key] = out.results[key]
        recorded.setdefault(PROVENANCE, {})[key] = {
            "from": "policy/", "command": command, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "max_diff_from_recorded": dict(out.max_diff)}
    if write and out.added:
        eval_path.write_text(json.dumps(recorded, indent=2))
        out.written = True
    return out


def describe(res: Evaluated) -> str:
    """A few lines per run: the figures of each evaluation and what became of them."""
    lines = [f"{res.run_dir}:"]
    for key, got in res.results.items():
        figures = ", ".join(f"{k} {got[k]:.3f}" for k in ("exact_match", "answer_in_result", "tool_success") if k in got)
        if key in res.added:
            fate = "added to eval.json" if res.written else "eval.json lacks it; not written"
        elif key in res.max_diff:
            d = res.max_diff[key]
            fate = "the same as the run's own" if d <= SAME else f"differs from the run's own by up to {d:.3f}"
        else:
            fate = "not written"
        lines.append(f"  {key:15} {figures}  ({fate})")
    return "\n".join(lines)

