"""Cluster plumbing for the driver: placement, the learner rendezvous, restarts.

- :func:`check_placement` (defined in ``common.config``, run by ``Config.validate``) rejects impossible
  placements before Ray starts.
- :class:`Placement` reserves one placement-group bundle per learner rank (``placement.learner_strategy``,
  PACK by default so the data-parallel group stays on as few nodes as possible). Generators get
  GPUs of their own by default: the learner's GPUs are reserved by the group, so Ray places
  generators elsewhere. With ``placement.colocate`` generator ``i`` is scheduled into learner rank
  ``i``'s bundle and shares its GPU (fractional ``num_gpus``).
- :meth:`Placement.rendezvous` finds the address and a free port on rank 0's node for
  ``torch.distributed`` (loopback when every rank sits on one node).
- :class:`RestartCounter` reads Ray's restart count of the run's actors from the GCS.

Ray is imported inside the functions: ``check_placement`` and ``learner_bundles`` are plain.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from common import metrics as M
from common.config import Config, check_placement  # noqa: F401 - the placement rules live with the config

log = logging.getLogger(__name__)


def kill_actors(handles: list[Any]) -> None:
    """Kill a run's actors without restarts (best effort: one that is gone already is skipped)."""
    import ray

    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception as e:  # noqa: BLE001 - best effort at shutdown
            log.debug("could not kill an actor: %s", e)


def learner_bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per learner rank; with colocation, generator ``i``'s resources join bundle ``i``."""
    lc, g = cfg.learner, cfg.generators
    bundles = []
    for r in range(lc.num_ranks):
        cpus, gpus = lc.num_cpus, lc.num_gpus
        if cfg.placement.colocate and r < g.num:
            cpus, gpus = cpus + g.num_cpus, gpus + g.num_gpus
        bundles.append({k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0})
    return bundles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_endpoint() -> tuple[str, int]:
    import ray

    return ray.util.get_node_ip_address(), _free_port()


class Placement:
    """The learner's placement group and where every role is scheduled."""

    def __init__(self, cfg: Config, name: str):
        import ray
        from ray.util.placement_group import placement_group

        self.cfg = cfg
        self.bundles = learner_bundles(cfg)
        strategy = cfg.placement.learner_strategy
        self.pg = placement_group(self.bundles, strategy=strategy, name=f"turnrl-learner-{name}")
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.placement.timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"placement group for {cfg.learner.num_ranks} learner rank(s) ({strategy}, bundles {self.bundles}) "
                f"was not placed within placement.timeout_s={cfg.placement.timeout_s:g}s; cluster total "
                f"{ray.cluster_resources()}, available {ray.available_resources()}")
        log.info("learner placement group ready: %d bundle(s) %s, strategy %s, colocate=%s",
                 len(self.bundles), self.bundles, strategy, cfg.placement.colocate)

    def _bundle(self, index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def learner_options(self, rank: int) -> dict[str, Any]:
        lc = self.cfg.learner
        return {"num_cpus": lc.num_cpus, "num_gpus": lc.num_gpus, "scheduling_strategy": self._bundle(rank)}

    def generator_options(self, index: int) -> dict[str, Any]:
        """Extra ``.options`` for generator ``index``: its learner bundle when colocated, else nothing."""
        return {"scheduling_strategy": self._bundle(index)} if self.cfg.placement.colocate else {}

    def rendezvous(self) -> tuple[str, int]:
        """``(MASTER_ADDR, MASTER_PORT)`` for the data-parallel group, found on rank 0's node."""
        import ray
        from ray.util.placement_group import placement_group_table
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        probe = ray.remote(_node_endpoint).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0], soft=False))
        ip, port = ray.get(probe.remote())
        addr = "127.0.0.1" if len(set(nodes.values())) == 1 else ip
        log.info("learner rendezvous at %s:%d (%d node(s))", addr, port, len(set(nodes.values())))
        return addr, port

    def remove(self) -> None:
        import ray

        try:
            ray.util.remove_placement_group(self.pg)
        except Exception as e:  # noqa: BLE001 - best effort at shutdown
            log.debug("could not remove the placement group: %s", e)


class RestartCounter:
    """Ray's restart count (``NumRestarts`` in the GCS actor table) of the run's actors, by role."""

    def __init__(self, roles: dict[str, list[Any]]):
        self.ids = {role: [h._actor_id.hex() for h in handles] for role, handles in roles.items()}
        self._warned = False

    def sample(self) -> dict[str, float]:
        try:
            from ray._private import state

            counts = {}
            for role, ids in self.ids.items():
                counts[role] = float(sum(int(state.actors(actor_id=a).get("NumRestarts", 0)) for a in ids))
        except Exception as e:  # noqa: BLE001 - a private API; metrics must never stop training
            if not self._warned:
                log.warning("actor restart counts unavailable: %s", e)
                self._warned = True
            return {}
        out = {M.ACTOR_RESTARTS_ROLE.format(role=r): v for r, v in counts.items()}
        out[M.ACTOR_RESTARTS] = sum(counts.values())
        return out
