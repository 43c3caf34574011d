"""Training-step time of turnrl against what a user would run instead, on one workload, in one run.

The workload is the embedded default (``deploy/configs/local.yaml``: the warm-start policy, the demo
data, ``WikiSearchEnv`` with BM25, 16 questions x G = 8 = 128 two-turn episodes per step, 64 tokens
per turn, lr 1e-3, one PPO epoch, micro-batches of 64). Four systems train on it, each in a process
of its own, one after the other, alternating for ``--repeats`` rounds:

* ``turnrl-sync``: the driver's loop (rollout -> update -> weight push) through the Ray actors;
* ``turnrl-async``: ``learner.async_loop.AsyncLoop`` (generation runs on while the learner trains);
* ``plain``: a single-process loop with HF ``generate`` and one PPO pass (``step_peers.run_plain``);
* ``trl``: TRL's ``GRPOTrainer`` with a multi-turn ``rollout_func`` (``step_peers.run_trl``).

The peers run the same episodes as turnrl (same template, env, observation glue, caps and
rewards; see ``step_peers.py``). Each process runs ``--warmup`` untimed steps, then ``--steps``
timed ones; a system's figure is the median over its timed steps of all rounds. Printed: the step,
rollout and update seconds of each system, the learner's token counts (turnrl: tokens its forwards
ran over against the batch's distinct tokens), and on the last line

    step ratio: X        (the faster peer's median step time / turnrl-sync's)

TRL needs ``requirements-bench.txt`` (``make bench`` installs it); without it the ``trl`` row is skipped.

    .venv/bin/python tests/benchmarks/bench_step.py [--steps 6 --warmup 2 --repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEMS = ("turnrl-sync", "turnrl-async", "plain", "trl")


def run_turnrl(cfg, mode: str, steps: int, warmup: int) -> None:
    """turnrl's own loop in ``mode``; one JSON line per timed step."""
    import tempfile

    import ray

    from common import metrics as M
    from env_workers.prepare import prepare_data
    from learner.async_loop import AsyncLoop
    from learner.trainer import Trainer

    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": str(REPO)}})
    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="turnrl-bench-step-")), prepare_data(cfg.data))
    loop = AsyncLoop(trainer) if mode == "async" else None
    n = cfg.algorithm.prompts_per_step
    try:
        for step in range(1, warmup + steps + 1):
            t0 = time.perf_counter()
            if loop is not None:
                stats = loop.step(step)
            else:
                res = trainer.rollout_phase(trainer.sampler.next(n), step)
                stats = trainer.update_phase(n)
                stats[M.TIME_ROLLOUT] = res["seconds"]
                stats[M.TIME_SYNC] = trainer.sync_phase()
            dt = time.perf_counter() - t0
            if step > warmup:
                print("STEP", json.dumps({"step_s": dt, "rollout_s": stats.get(M.TIME_ROLLOUT, float("nan")),
                                  "update_s": stats[M.TIME_UPDATE] + stats[M.TIME_ADVANTAGE],
                                  "tokens": stats[M.LEARNER_TOKENS], "unique_tokens": stats[M.LEARNER_UNIQUE_TOKENS],
                                  "reward": stats[M.REWARD_TOTAL]}), flush=True)
        if loop is not None:
            loop.close()
    finally:
        trainer.close()
        ray.shutdown()


def child(system: str, steps: int, warmup: int, overrides: list[str]) -> None:
    from common.config import load_config

    os.chdir(REPO)  # data.dir and model.path of the embedded config are relative to the repository
    base = ["metrics.enabled=false", "checkpoint.every_steps=0"]
    if system == "turnrl-async":
        base.append("rollout.mode=async")
    cfg = load_config(REPO / "deploy/configs/local.yaml", base + overrides)
    if system.startswith("turnrl"):
        run_turnrl(cfg, "async" if system == "turnrl-async" else "sync", steps, warmup)
    else:
        from tests.benchmarks import step_peers

        (step_peers.run_plain if system == "plain" else step_peers.run_trl)(cfg, steps, warmup)


def have_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per system and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per system and round")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the systems")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: run one system in this process
    ap.add_argument("overrides", nargs="*", help="config overrides for every system, key=value")
    args = ap.parse_args()
    if args.run:
        child(args.run, args.steps, args.warmup, args.overrides)
        return
    systems = [s for s in args.systems.split(",") if s]
    if "trl" in systems and not have_trl():
        print("trl is not installed (pip install -r requirements-bench.txt): skipping the trl row", flush=True)
        systems.remove("trl")
    print(f"load before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    rows: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.repeats):
        for system in systems:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--run", system, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), *args.overrides],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"{system} failed (exit {proc.returncode})")
            got = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("STEP {")]
            rows[system] += got
            print(f"round {r} {system:<13} {len(got)} steps, median step "
                  f"{statistics.median(x['step_s'] for x in got):.2f} s ({time.perf_counter() - t0:.0f} s with start-up)",
                  flush=True)
    med = {s: {k: statistics.median(x[k] for x in rs if k in x) for k in rs[0]} for s, rs in rows.items()}
    print(f"\nload after: {os.getloadavg()[0]:.2f}; medians over {args.repeats} rounds x {args.steps} steps")
    print(f"{'system':<14}{'step s':>8}{'rollout s':>11}{'update s':>10}{'learner tokens':>16}{'distinct':>10}")
    for s, m in med.items():
        toks = f"{m['tokens']:>16.0f}{m['unique_tokens']:>10.0f}" if "tokens" in m else f"{'':>16}{'':>10}"
        print(f"{s:<14}{m['step_s']:>8.2f}{m['rollout_s']:>11.2f}{m['update_s']:>10.2f}{toks}")
    ours = med["turnrl-sync"]["step_s"]
    for s in med:
        if s != "turnrl-sync":
            print(f"{s}/turnrl-sync step: {med[s]['step_s'] / ours:.2f}")
    peers = [med[s]["step_s"] for s in ("plain", "trl") if s in med]
    print(f"step ratio: {min(peers) / ours:.2f}")


if __name__ == "__main__":
    main()
