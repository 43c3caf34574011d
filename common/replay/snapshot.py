"""Snapshot / restore of a ``ReplayStore``: contents as an Arrow IPC file, state and counters as JSON.

Layout of a snapshot directory (never pickle):

    rows.arrow   every held row (spilled ones included), group by group in arrival order
    state.json   format, row count, group order, release order of complete groups, retired
                 group ids, the last learner version seen, counters, the config it ran with

Take it together with the learner checkpoint, so that after a crash both resume from the same
point: groups released after the snapshot are released again, to a learner that never saw them.
Each row keeps its ``policy_version``, so after a restore the lag bound is checked against the
version the (restored) learner passes to its next get.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from common.replay.rows import schema_name
from common.replay.store import COUNTERS, ReplayStore
from common.replay.wire import write_ipc_file
from common.schema import derived_since, upgrade_batch

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "turnrl.replay_queue/1"
ROWS_FILE = "rows.arrow"
STATE_FILE = "state.json"


def write_snapshot(store: ReplayStore, path: str | os.PathLike) -> dict[str, Any]:
    """Write ``store`` to directory ``path`` (files under temporary names, renamed; the JSON last)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    groups = store._groups
    write_ipc_file(d / (ROWS_FILE + ".tmp"), (b for g in groups.values() for b in store._group_batches(g)),
                   store.schema)
    os.replace(d / (ROWS_FILE + ".tmp"), d / ROWS_FILE)
    state = {
        "format": SNAPSHOT_FORMAT,
        "rows": store.rows,
        "groups": list(groups),
        "ready": [i for i in store._ready if i in groups and groups[i].complete],
        "retired": sorted(store._retired),
        "learner_version": store.learner_version,
        "counters": {name: getattr(store, name) for name in COUNTERS},
        "config": {"capacity_rows": store.capacity_rows, "capacity_bytes": store.capacity_bytes,
                   "max_policy_lag": store.max_policy_lag, "stale_mode": store.stale_mode,
                   "stale_decay": store.stale_decay, "memory_bytes": store.memory_bytes},
        "schema": store.schema.to_string(show_schema_metadata=False),
    }
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / STATE_FILE)
    return state


def load_snapshot(store: ReplayStore, path: str | os.PathLike) -> int:
    """Load directory ``path`` into the empty ``store``; return the rows loaded.

    ``store``'s configuration (capacity, bound, mode, spill) applies, not the snapshot's.
    Raises ValueError if the two files disagree (a damaged snapshot), leaving ``store`` empty.
    """
    if store.n_groups:
        raise RuntimeError(f"restore needs an empty queue; this one holds {store.n_groups} groups")
    d = Path(path)
    state = json.loads((d / STATE_FILE).read_text())
    if state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{d}: not a replay-queue snapshot (format {state.get('format')!r})")
    if state["config"]["max_policy_lag"] != store.max_policy_lag:
        log.warning("restoring a snapshot taken with max_policy_lag=%s under max_policy_lag=%s",
                    state["config"]["max_policy_lag"], store.max_policy_lag)
    store._retired, store.learner_version = set(), None  # nothing is late or stale while loading
    with pa.OSFile(str(d / ROWS_FILE), "rb") as source:
        reader = pa.ipc.open_file(source)
        if derived_since(reader.schema, store.schema) is None:  # an older snapshot may lack derived columns
            raise TypeError(f"{d / ROWS_FILE}: schema differs from the queue's ({schema_name(store.schema)})")
        for i in range(reader.num_record_batches):  # one group per batch, in arrival order
            store.put(upgrade_batch(reader.get_batch(i), store.schema))
    complete = {i for i, g in store._groups.items() if g.complete}
    if store.rows != state["rows"] or list(store._groups) != state["groups"] or complete != set(state["ready"]):
        store._clear()
        raise ValueError(f"{d}: {ROWS_FILE} and {STATE_FILE} disagree; the snapshot is damaged")
    store._ready = deque(state["ready"])
    store._retired = set(state["retired"])
    store.learner_version = state["learner_version"]
    for name in COUNTERS:
        setattr(store, name, state["counters"].get(name, 0))
    return store.rows
