"""learner.cluster on a real (in-process) Ray: placement groups, colocation, restarts, discovery files."""

from __future__ import annotations

import time

import pytest

from common import metrics as M
from common.config import load_config
from learner.cluster import Placement, RestartCounter


class Where:
    """A trivial actor that reports the placement group and bundle it was scheduled into."""

    def where(self) -> str | None:
        import ray

        pg = ray.get_runtime_context().get_placement_group_id()
        return pg


def _cfg(*overrides: str):
    return load_config(None, ["learner.num_ranks=2", "learner.num_cpus=0.5", "generators.num=1",
                              "generators.num_cpus=0.5", *overrides])


@pytest.mark.parametrize("colocate", [False, True])
def test_learner_ranks_share_a_placement_group_generators_only_when_colocated(ray_local, colocate):
    ray = ray_local
    placement = Placement(_cfg(f"placement.colocate={str(colocate).lower()}"), "test")
    actors = []
    try:
        pg_id = placement.pg.id.hex()
        actor = ray.remote(Where)
        learners = [actor.options(**placement.learner_options(r)).remote() for r in range(2)]
        generator = actor.options(num_cpus=0.5, **placement.generator_options(0)).remote()
        actors = [*learners, generator]
        assert ray.get([a.where.remote() for a in learners]) == [pg_id, pg_id]
        assert (ray.get(generator.where.remote()) == pg_id) is colocate
        assert placement.rendezvous()[0] == "127.0.0.1"  # every bundle on this one node
    finally:
        for a in actors:
            ray.kill(a)
        placement.remove()


def test_unplaceable_group_fails_naming_the_resources(ray_local):
    with pytest.raises(RuntimeError, match=r"GPU.*was not placed within placement.timeout_s=2s"):
        Placement(_cfg("learner.num_gpus=1", "placement.timeout_s=2"), "nogpu")


class Fragile:
    def pid(self) -> int:
        import os

        return os.getpid()


def test_restart_counter_sees_a_restarted_actor(ray_local):
    ray = ray_local
    a = ray.remote(Fragile).options(num_cpus=0, max_restarts=2).remote()
    try:
        first = ray.get(a.pid.remote())
        counter = RestartCounter({"generator": [a]})
        assert counter.sample()[M.ACTOR_RESTARTS] == 0
        ray.kill(a, no_restart=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ray.get(a.pid.remote(), timeout=30) != first:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
        sample = counter.sample()
        assert sample[M.ACTOR_RESTARTS_ROLE.format(role="generator")] == 1 and sample[M.ACTOR_RESTARTS] == 1
    finally:
        ray.kill(a)
