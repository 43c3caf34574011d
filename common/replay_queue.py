"""Arrow-backed replay queue of per-turn transitions (implementation in ``common.replay``).

Producers put RecordBatches of finished turns (schema in ``common.schema``); the queue hands
the learner only *complete* groups, as one Arrow table, oldest completion first, within the
policy-lag bound. See ``common.replay.store`` for the rules and ``common.replay.actor`` for
backpressure and blocking gets.
"""

from common.replay import (
                           STALE_MODES,
                           STALENESS_WEIGHT,
                           QueueFull,
                           ReplayQueue,
                           ReplayStore,
                           check_schema,
                           register_arrow_serializers,
)

__all__ = ["ReplayQueue", "ReplayStore", "QueueFull", "STALENESS_WEIGHT", "STALE_MODES", "check_schema",
           "register_arrow_serializers"]
