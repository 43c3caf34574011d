"""Config to engine, and learner to generators, through real Ray actors (DeepSpeed learner on CPU).

- every ``generators.*`` setting the driver passes (``learner.trainer.generator_kwargs`` /
  ``rollout_kwargs``, the functions the Trainer builds its actors with) reaches the engine inside
  the generator actor, read back from the actor;
- ``learner.weight_sync: broadcast`` (gloo on CPU, the code path NCCL takes on GPU): after a
  push the generators hold the learner's weights bit for bit and report the new version; the
  object-store path gives the same; a generator killed in broadcast mode comes back with the
  latest weights (copied from its peer) and the next push forms the group again.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

from actors.generator import Generator, WeightStore
from actors.rollout import RolloutWorker
from common import metrics as M
from common.config import load_config, weight_sync_mode
from learner.trainer import generator_kwargs, rollout_kwargs
from learner.weight_sync import BroadcastSync, ObjectStoreSync
from learner.worker import LearnerWorker
from tests.learner.test_multirank import GROUPS, G, _table

OVERRIDES = ["generators.num=2", "generators.kv_budget_tokens=4096", "generators.max_prefill_tokens=96",
             "generators.keep_kv_across_versions=true", "generators.torch_threads=1", "generators.streaming=true",
             "generators.lean_forward=false",
             "generation.max_tokens_per_turn=12", "generation.max_tokens_per_episode=300",
             "rollout.partial_rollouts=abort", "rollout.max_aborts_per_episode=5",
             "learner.weight_sync=broadcast", "learner.micro_batch_size=4", "learner.lr=0.01", "learner.torch_threads=1",
             f"algorithm.group_size={G}", f"algorithm.prompts_per_step={GROUPS}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def actors(ray_local, tiny_policy):
    ray = ray_local
    cfg = load_config(None, OVERRIDES)
    lc, a = cfg.learner, cfg.algorithm
    learner = ray.remote(LearnerWorker).options(num_cpus=0).remote(
        str(tiny_policy), learner={**vars(lc), "betas": list(lc.betas), "dtype": "float32"}, algorithm=vars(a),
        temperature=1.0, batch_episodes=GROUPS * G, master_port=_free_port(), seed=0)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    gens = [ray.remote(Generator).options(num_cpus=0, max_restarts=1, max_task_retries=1).remote(
        str(tiny_policy), weight_store=store, **generator_kwargs(cfg)) for _ in range(cfg.generators.num)]
    ray.get([g.ping.remote() for g in gens] + [learner.get_version.remote()])
    yield {"ray": ray, "cfg": cfg, "learner": learner, "store": store, "gens": gens, "path": str(tiny_policy),
           "table": _table(_vocab(tiny_policy))}
    for h in gens + [learner, store]:
        ray.kill(h, no_restart=True)


def _vocab(path) -> int:
    from common.modeling import load_tokenizer

    return len(load_tokenizer(path))


def test_generator_settings_reach_the_engine_in_the_actor(actors):
    ray, cfg = actors["ray"], actors["cfg"]
    for s in ray.get([g.settings.remote() for g in actors["gens"]]):
        assert s["kv_budget_tokens"] == 4096 != type(cfg.generators)().kv_budget_tokens
        assert s["max_prefill_tokens"] == 96 and s["keep_kv_across_versions"] is True
        assert s["lean_forward"] is False  # read from the engine: it runs the transformers modules
        assert s["torch_threads"] == 1 and s["backend"] == "hf"
        assert s["vllm_kwargs"]["gpu_memory_utilization"] == cfg.generators.vllm_gpu_memory_utilization
    stats = ray.get(actors["gens"][0].stats.remote())
    assert stats["kv_budget_tokens"] == 4096  # the scheduler's own budget, not just the stored argument
    worker = RolloutWorker(actors["path"], actors["gens"], [], **rollout_kwargs(cfg))
    assert worker.streaming is True
    assert (worker.max_tokens_per_turn, worker.max_tokens_per_episode) == (12, 300)
    assert (worker.partial_rollouts, worker.max_aborts_per_episode) == ("abort", 5)


def _generator_state(ray, gen) -> tuple[int, dict[str, torch.Tensor]]:
    version, refs = ray.get(gen.export_weights.remote(16 * 1024))
    return version, {k: v.clone() for b in ray.get(refs) for k, v in b.tensors().items()}


def _assert_generators_hold_the_learner_weights(actors, version: int) -> None:
    ray = actors["ray"]
    want = ray.get(actors["learner"].state_dict.remote())
    for gen in actors["gens"]:
        got_version, got = _generator_state(ray, gen)
        assert got_version == version
        assert set(got) == set(want)
        for k, w in want.items():
            assert torch.equal(got[k], w), f"{k} differs after the push"


def _train_step(actors) -> int:
    ray = actors["ray"]
    return int(ray.get(actors["learner"].train_step.remote(actors["table"]))[M.POLICY_VERSION])


def test_broadcast_push_gives_the_generators_the_learner_weights_bit_for_bit(actors):
    ray, cfg = actors["ray"], actors["cfg"]
    assert weight_sync_mode(cfg) == ("broadcast", "gloo")  # no GPUs: gloo, the same calls NCCL takes
    before = _generator_state(ray, actors["gens"][0])[1]
    sync = BroadcastSync([actors["learner"]], actors["gens"], actors["store"], 16 * 1024, "gloo", timeout_s=120)
    assert len(sync.plan) > 1  # several buckets
    version = _train_step(actors)
    assert version == 1
    sync.push(version)
    _assert_generators_hold_the_learner_weights(actors, version)
    after = _generator_state(ray, actors["gens"][0])[1]
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step did not move the weights"
    assert ray.get(actors["store"].latest.remote()) == (version, None)  # no buckets in the object store
    # the object-store path lands on the same weights
    version = _train_step(actors)
    ObjectStoreSync([actors["learner"]], actors["gens"], actors["store"], 16 * 1024).push(version)
    _assert_generators_hold_the_learner_weights(actors, version)
    # and the group is still usable for the next broadcast
    version = _train_step(actors)
    sync.push(version)
    _assert_generators_hold_the_learner_weights(actors, version)
    assert sync.formed == 1
    actors["sync"] = sync


def test_killed_generator_in_broadcast_mode_copies_a_peer_and_rejoins(actors):
    ray = actors["ray"]
    sync = actors.get("sync") or BroadcastSync([actors["learner"]], actors["gens"], actors["store"], 16 * 1024,
                                               "gloo", timeout_s=120)
    version = _train_step(actors)
    sync.push(version)
    victim = actors["gens"][1]
    before = ray.get(victim.instance_id.remote())
    ray.kill(victim, no_restart=False)  # asynchronous: poll until the restarted process answers
    deadline = time.time() + 120
    while ray.get(victim.instance_id.remote()) == before and time.time() < deadline:
        time.sleep(0.2)
    assert ray.get(victim.instance_id.remote()) != before
    assert ray.get(victim.version.remote()) == version  # copied from generator 0 before serving
    _assert_generators_hold_the_learner_weights(actors, version)
    formed = sync.formed
    version = _train_step(actors)
    sync.push(version)  # notices the restart and forms the group again
    assert sync.formed == formed + 1
    _assert_generators_hold_the_learner_weights(actors, version)
