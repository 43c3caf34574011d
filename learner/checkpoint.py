"""Resumable checkpoints: everything a run needs to go on from step k as if it had never stopped.

Layout (one directory per checkpoint; ``checkpoint.dir``, default ``<run_dir>/checkpoints``):

    step_000002/
      deepspeed/               engine.save_checkpoint on every learner rank: weights, optimizer, LR schedule
      latest                   (DeepSpeed's pointer to ``deepspeed``)
      learner_rng_rank{r}.safetensors   each rank's torch RNG states
      queue/                   replay-queue snapshot (Arrow IPC + JSON, ``common.replay.snapshot``)
      driver_state.json        written last: step, policy version, episode/group counters, sampler
                               epoch/pos, Python/NumPy RNG states, audit counters and ledgers, restart
                               counts, the pre-training evaluation, and the settings a resume must keep

A checkpoint is written under ``step_XXXXXX.partial`` and renamed when complete, so a crash while
saving never leaves a half checkpoint behind; ``latest_checkpoint`` only considers directories
with a ``driver_state.json``. Only the newest ``checkpoint.keep`` are kept.

Nothing here unpickles: the driver state is JSON, RNG states are safetensors, the queue snapshot
is Arrow + JSON, and DeepSpeed's own files are read through :class:`WeightsOnlyCheckpointEngine`
(``torch.load(weights_only=True)`` with three DeepSpeed classes allow-listed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "driver_state.json"
FORMAT = "turnrl.checkpoint/1"
DS_TAG = "deepspeed"
QUEUE_DIR = "queue"
#: Settings a resumed run must share with the checkpoint (they fix the data order, batch and engine layout).
MUST_MATCH = ("run.seed", "algorithm.group_size", "algorithm.prompts_per_step", "learner.num_ranks",
              "learner.zero_stage", "model.dtype", "data.max_hops")


# -- paths --------------------------------------------------------------------------------
def checkpoint_root(cfg: Any, run_dir: Path) -> Path:
    """``checkpoint.dir`` or ``<run_dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a driver state), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step_*") if d.is_dir() and not d.name.endswith(".partial")
             and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: d.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and stale ``.partial`` ones); return what was removed."""
    root = Path(root)
    gone = [d for d in root.glob("step_*.partial") if d.is_dir()]
    gone += list_checkpoints(root)[:-keep] if keep > 0 else []
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


# -- the driver state -----------------------------------------------------------------------
def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The ``MUST_MATCH`` settings of ``cfg`` by dotted name."""
    out = {}
    for dotted in MUST_MATCH:
        section, key = dotted.split(".")
        out[dotted] = getattr(getattr(cfg, section), key)
    return out


def check_compatible(cfg: Any, state: dict[str, Any], where: Path) -> None:
    """Raise ``ConfigError`` naming the field if ``cfg`` changes a setting the checkpoint depends on."""
    from common.config import ConfigError

    saved = state.get("config", {})
    for dotted, value in config_fingerprint(cfg).items():
        if dotted in saved and saved[dotted] != value:
            raise ConfigError(f"config field `{dotted}` = {value!r}: the checkpoint {str(where)!r} was written with "
                              f"{saved[dotted]!r}, and resuming needs the same value")


def rng_state() -> dict[str, Any]:
    """The driver's Python and NumPy global RNG states as JSON-able values."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = Path(directory) / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **state}, indent=1))
    os.replace(tmp, Path(directory) / STATE_FILE)


def read_state(directory: Path) -> dict[str, Any]:
    """The driver state of a checkpoint; ValueError naming the file if it is not one."""
    path = Path(directory) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint state {str(path)!r} is unreadable ({e}); expected JSON written by turnrl") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint state {str(path)!r}: format {state.get('format') if isinstance(state, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return state


def find_resume_checkpoint(run_dir: Path, cfg: Any) -> Path:
    """The newest checkpoint of ``run_dir``; FileNotFoundError saying what was looked for if there is none."""
    root = checkpoint_root(cfg, run_dir)
    found = latest_checkpoint(root)
    if found is None:
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: no checkpoint in {str(root)!r} (expected step_*/"
                                f"{STATE_FILE}; was checkpoint.every_steps > 0 in that run?)")
    return found


def truncate_metrics(path: Path, step: int) -> int:
    """Drop ``metrics.jsonl`` lines of steps after ``step`` (logged after the checkpoint); return lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except ValueError:
            later = True  # a line cut by the crash
        if later:
            dropped += 1
        else:
            kept.append(line)
    path.write_text("".join(x + "\n" for x in kept))
    return dropped


# -- DeepSpeed, on the learner ranks ----------------------------------------------------------
def _safe_globals() -> list:
    """DeepSpeed classes inside its optimizer-state files (plain data holders)."""
    out = []
    for mod, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            module = __import__(mod, fromlist=[name])
            out.append(getattr(module, name))
        except (ImportError, AttributeError):
            pass
    return out


def weights_only_engine(config_params: Any) -> Any:
    """A DeepSpeed ``TorchCheckpointEngine`` whose ``load`` never unpickles arbitrary objects."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - name the file; never fall back to a full unpickle
                raise ValueError(f"DeepSpeed checkpoint file {path!r} cannot be loaded with weights_only=True: {e}") from None

    return WeightsOnlyCheckpointEngine(config_params)


def use_weights_only_loading(engine: Any) -> None:
    """Swap the engine's checkpoint engine for :func:`weights_only_engine` (the default torch one only)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "turnrl loads checkpoints only through TorchCheckpointEngine with weights_only=True")
    engine.checkpoint_engine = weights_only_engine(engine._config)


def save_engine(engine: Any, directory: str, rank: int, client_state: dict[str, Any]) -> None:
    """Every rank: DeepSpeed checkpoint into ``directory/deepspeed`` plus this rank's torch RNG (safetensors)."""
    import torch
    from safetensors.torch import save_file

    engine.save_checkpoint(directory, tag=DS_TAG, client_state=client_state)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(Path(directory) / f"learner_rng_rank{rank}.safetensors"))


def load_engine(engine: Any, directory: str, rank: int) -> dict[str, Any]:
    """Every rank: load weights, optimizer and LR schedule; restore this rank's RNG; return the client state."""
    import torch
    from safetensors.torch import load_file

    use_weights_only_loading(engine)
    path, client = engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint {DS_TAG!r} in {directory!r}")
    rng_file = Path(directory) / f"learner_rng_rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return dict(client or {})


# -- the driver side ---------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores a ``learner.trainer.Trainer`` (its actors, counters and sampler).

    ``save`` is a collective over the learner ranks (each writes its DeepSpeed shard), then the
    queue snapshot, then the driver state; ``restore`` reverses it, and pushes the restored
    weights to the generators before any rollout.
    """

    def __init__(self, cfg: Any, run_dir: Path):
        self.cfg = cfg
        self.root = checkpoint_root(cfg, run_dir)
        self.every = cfg.checkpoint.every_steps
        self.last_step = 0
        self.last_seconds = 0.0

    def due(self, step: int, final: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or final)

    def save(self, trainer: Any, step: int, extra: dict[str, Any]) -> Path:
        """Write checkpoint ``step``; ``extra`` joins the driver state (eval results, restart counts)."""
        import ray

        t0 = time.time()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        client = {"version": int(trainer.version), "step": int(step)}
        ray.get([lw.save_checkpoint.remote(str(tmp.resolve()), client) for lw in trainer.learners])
        ray.get(trainer.queue.snapshot.remote(str((tmp / QUEUE_DIR).resolve())))
        state = {
            "step": step, "policy_version": int(trainer.version),
            "episode_counter": trainer.episode_counter, "group_counter": trainer.group_counter,
            "sampler": trainer.sampler.state(), "rng": rng_state(), "audit": trainer.audit.state(),
            "config": config_fingerprint(self.cfg), "time": time.time(), **extra,
        }
        write_state(tmp, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        removed = prune(self.root, self.cfg.checkpoint.keep)
        self.last_step, self.last_seconds = step, time.time() - t0
        log.info("checkpoint step %d written to %s in %.1f s%s", step, final, self.last_seconds,
                 f" (removed {', '.join(d.name for d in removed)})" if removed else "")
        return final

    def restore(self, trainer: Any, directory: Path) -> dict[str, Any]:
        """Load checkpoint ``directory`` into ``trainer``; returns its driver state."""
        import ray

        state = read_state(directory)
        check_compatible(self.cfg, state, directory)
        clients = ray.get([lw.load_checkpoint.remote(str(Path(directory).resolve())) for lw in trainer.learners])
        version = int(clients[0].get("version", state["policy_version"]))
        if version != state["policy_version"]:
            raise ValueError(f"checkpoint {str(directory)!r}: learner version {version} != driver state "
                             f"{state['policy_version']}; the checkpoint is damaged")
        trainer.version = version
        trainer.episode_counter, trainer.group_counter = state["episode_counter"], state["group_counter"]
        trainer.sampler.load_state(state["sampler"])
        trainer.audit.load_state(state["audit"])
        set_rng_state(state["rng"])
        ray.get(trainer.queue.restore.remote(str((Path(directory) / QUEUE_DIR).resolve())))
        aborted = ray.get(trainer.queue.abort_groups.remote(None))  # their producer is gone: sampled again
        if aborted:
            log.warning("resume: dropped %d rows of groups that were still being generated at the checkpoint", aborted)
        trainer.sync_phase()  # generators start from the restored weights, not from model.path
        self.last_step = int(state["step"])
        log.info("resumed from %s: step %d, policy version %d, %d episodes so far", directory, state["step"],
                 version, trainer.episode_counter)
        return state
