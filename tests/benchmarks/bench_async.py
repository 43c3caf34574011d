"""End-to-end training throughput, asynchronous vs synchronous actor-learner mode, same run.

A ``learner.trainer.Trainer`` per mode (generator, env worker, replay queue, rollout worker, DeepSpeed
learner on CPU; each mode's own torch threads, see ``common.config.torch_threads``) is built from the
embedded config (``deploy/configs/local.yaml``, warm-start policy, demo data) with the batch set by
``--prompts`` / ``--group-size``. Each round runs
``--steps`` timed training steps in synchronous mode (rollout -> update -> weight push, the
driver's loop) and then in asynchronous mode (``learner.async_loop.AsyncLoop``: generation
continues while the learner trains, lag <= ``queue.max_policy_lag``). Before its timed steps,
each mode runs ``--warmup`` untimed steps; for async these fill the pipeline, so the figures
are steady-state. Modes alternate for ``--repeats`` rounds. Figures are medians over rounds:

* trained episodes/s = steps x prompts x G / wall seconds of the timed steps;
* learner idle fraction = 1 - (update + advantage seconds) / wall seconds: the share of the
  time the learner is not computing (in sync mode it waits for the whole rollout);
* the largest policy lag of any trained batch (async: <= max_policy_lag).

The same comparison then runs with a slower environment, ``env.step_latency_s`` (seconds added
to every env step call, a stand-in for a slow tool API) = ``--env-latency``, on a second pair of Trainers.

    .venv/bin/python tests/benchmarks/bench_async.py [--prompts 8 --group-size 8 --steps 4 --repeats 2]

Last line: ``async ratio: X`` (async over sync trained episodes/s, embedded config).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import metrics as M  # noqa: E402
from common import schema as S  # noqa: E402
from common.config import load_config  # noqa: E402

log = logging.getLogger("bench_async")


def run_mode(trainer, mode: str, steps: int, warmup: int, first_step: int) -> dict[str, float]:
    """``warmup`` + ``steps`` training steps in ``mode``; figures over the timed steps."""
    from learner.async_loop import AsyncLoop, batch_lag

    import ray

    n = trainer.cfg.algorithm.prompts_per_step
    dropped0 = ray.get(trainer.queue.stats.remote())[M.QUEUE_DROPPED_STALE]
    loop = AsyncLoop(trainer) if mode == "async" else None
    lags: list[int] = []
    mixed = [0]  # trained episodes whose turns came from more than one policy version
    get = trainer.train_on

    def recording(table):
        lags.append(batch_lag(table, trainer.version))
        versions: dict[int, set[int]] = {}
        for e, v in zip(table.column(S.EPISODE_ID).to_pylist(), table.column(S.POLICY_VERSION).to_pylist()):
            versions.setdefault(e, set()).add(v)
        mixed[0] += sum(len(v) > 1 for v in versions.values())
        return get(table)

    trainer.train_on = recording
    aborted0 = loop.aborted_episodes if loop is not None else 0
    wall = busy = 0.0
    try:
        for i in range(warmup + steps):
            step = first_step + i
            t0 = time.perf_counter()
            if loop is not None:
                stats = loop.step(step)
            else:
                trainer.rollout_phase(trainer.sampler.next(n), step)
                stats = trainer.update_phase(n)
                stats[M.TIME_SYNC] = trainer.sync_phase()
            dt = time.perf_counter() - t0
            if i >= warmup:
                wall += dt
                busy += stats[M.TIME_UPDATE] + stats[M.TIME_ADVANTAGE]
    finally:
        del trainer.train_on  # back to the class method
        if loop is not None:
            aborted0 = loop.aborted_episodes - aborted0
            loop.close()
    episodes = steps * n * trainer.cfg.algorithm.group_size
    dropped = ray.get(trainer.queue.stats.remote())[M.QUEUE_DROPPED_STALE] - dropped0
    return {"episodes_per_s": episodes / wall, "steps_per_s": steps / wall, "idle": 1.0 - busy / wall,
            "lag_max": float(max(lags[warmup:] or [0])), "stale_dropped": dropped, "wall_s": wall,
            "aborted": float(aborted0 if loop is not None else 0), "mixed_trained": float(mixed[0])}


def compare(cfgs: dict, args: argparse.Namespace, label: str) -> dict[str, dict[str, float]]:
    """Alternate sync and async rounds, each mode on a Trainer of its own config (its own torch threads:
    ``torch_threads: null`` gives each role every core in sync mode, half of them in async); medians per mode."""
    from env_workers.prepare import prepare_data
    from learner.trainer import Trainer

    trainers = {mode: Trainer(cfg, Path(tempfile.mkdtemp(prefix=f"turnrl-bench-{mode}-")), prepare_data(cfg.data))
                for mode, cfg in cfgs.items()}
    results: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    step = {mode: 1 for mode in results}
    try:
        for r in range(args.repeats):
            for mode in results:
                res = run_mode(trainers[mode], mode, args.steps, args.warmup, step[mode])
                step[mode] += args.steps + args.warmup
                results[mode].append(res)
                log.info("%s round %d %-5s %6.2f episodes/s  %5.3f steps/s  learner idle %4.2f  max lag %d  "
                         "stale groups dropped %d  episodes aborted %d  mixed-version episodes trained %d  (%.1f s)",
                         label, r, mode, res["episodes_per_s"], res["steps_per_s"], res["idle"], res["lag_max"],
                         res["stale_dropped"], res["aborted"], res["mixed_trained"], res["wall_s"])
    finally:
        for trainer in trainers.values():
            trainer.close()
    return {mode: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for mode, rs in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "deploy/configs/local.yaml"))
    ap.add_argument("--prompts", type=int, default=8, help="algorithm.prompts_per_step")
    ap.add_argument("--group-size", type=int, default=8, help="algorithm.group_size")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode and round")
    ap.add_argument("--repeats", type=int, default=2, help="rounds (sync then async)")
    ap.add_argument("--env-latency", type=float, default=4.0,
                    help="env.step_latency_s of the slow-env comparison (two env calls per step at max_turns 2)")
    ap.add_argument("--async-workers", type=int, default=1, help="rollout.num_workers of the async mode")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.chdir(REPO)  # data.dir and model.path of the embedded config are relative to the repository
    import ray

    base = [f"algorithm.prompts_per_step={args.prompts}", f"algorithm.group_size={args.group_size}",
            f"learner.micro_batch_size={min(64, args.prompts * args.group_size)}", "metrics.enabled=false",
            *args.overrides]

    def configs(*extra: str) -> dict:
        workers = {"sync": [], "async": [f"rollout.num_workers={args.async_workers}"]}
        return {mode: load_config(args.config, base + [f"rollout.mode={mode}", *workers[mode], *extra])
                for mode in ("sync", "async")}

    cfg = configs()["async"]
    # two Trainers live at once (one per mode): logical CPUs for both sets of actors (they never compute at once)
    ray.init(num_cpus=2 * (cfg.ray.num_cpus or os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": str(REPO)}})
    table = {"embedded": compare(configs(), args, "embedded")}
    slow = f"env latency {args.env_latency:g} s"
    table[slow] = compare(configs(f"env.step_latency_s={args.env_latency}"), args, slow)
    ray.shutdown()
    print(f"{args.prompts} prompts x G={args.group_size} per step, {args.steps} timed steps per mode and round, "
          f"{args.repeats} rounds, max_policy_lag={cfg.queue.max_policy_lag}, async rollout workers "
          f"{args.async_workers}; medians")
    print(f"{'config':<22}{'mode':<7}{'episodes/s':>11}{'steps/s':>9}{'learner idle':>14}{'max lag':>9}"
          f"{'stale dropped':>15}{'aborted':>9}{'mixed trained':>15}")
    for name, modes in table.items():
        for mode, m in modes.items():
            print(f"{name:<22}{mode:<7}{m['episodes_per_s']:>11.2f}{m['steps_per_s']:>9.3f}{m['idle']:>14.2f}"
                  f"{m['lag_max']:>9.0f}{m['stale_dropped']:>15.0f}{m['aborted']:>9.0f}{m['mixed_trained']:>15.0f}")
    ratios = {name: m["async"]["episodes_per_s"] / m["sync"]["episodes_per_s"] for name, m in table.items()}
    print(f"async ratio with {slow}: {ratios[slow]:.2f}")
    print(f"async ratio: {ratios['embedded']:.2f}")


if __name__ == "__main__":
    main()
