"""Arrow replay queue: per-turn transitions in, complete groups out, within a policy-lag bound.

``ReplayQueue`` (an asyncio Ray actor class) wraps ``ReplayStore`` (synchronous bookkeeping).
"""

from common.replay.actor import ReplayQueue
from common.replay.rows import check_schema
from common.replay.store import STALE_MODES, STALENESS_WEIGHT, QueueFull, ReplayStore
from common.replay.wire import register_arrow_serializers

__all__ = ["ReplayQueue", "ReplayStore", "QueueFull", "STALENESS_WEIGHT", "STALE_MODES", "check_schema",
           "register_arrow_serializers"]
