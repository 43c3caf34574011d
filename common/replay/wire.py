"""Arrow tables and batches between Ray processes as one Arrow IPC stream instead of per-array pickles.

Ray serializes a ``pa.Table``/``pa.RecordBatch`` through pickle, array by array (a 32-turn
batch of the transition schema: ~0.5 ms, and a sliced array drags its whole parent buffers
along); one IPC stream costs ~20 us and travels as a single out-of-band buffer.
``register_arrow_serializers()`` makes Ray use it for every table and batch *this process*
sends (Ray looks serializers up in the sending process; the receiver only needs this module
importable). The queue actor registers it for its own replies; producers and the driver call
it once to send their batches and tables the same way.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import pyarrow as pa

log = logging.getLogger(__name__)


def table_to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def table_from_ipc(buf: pa.Buffer) -> pa.Table:
    """Zero-copy over ``buf`` (for a learner that uses the table and lets it go)."""
    return pa.ipc.open_stream(buf).read_all()


def batch_to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def batch_from_ipc(buf: pa.Buffer) -> pa.RecordBatch:
    """Copied into this process's memory: a batch the queue holds must not pin Ray's object store."""
    return pa.ipc.open_stream(pa.py_buffer(memoryview(buf).tobytes())).read_next_batch()


def register_arrow_serializers() -> bool:
    """Send ``pa.Table``/``pa.RecordBatch`` from this Ray process as Arrow IPC; False if Ray is not running."""
    import ray

    if not ray.is_initialized():
        return False
    ray.util.register_serializer(pa.Table, serializer=table_to_ipc, deserializer=table_from_ipc)
    ray.util.register_serializer(pa.RecordBatch, serializer=batch_to_ipc, deserializer=batch_from_ipc)
    return True


def write_ipc_file(path: str | os.PathLike, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> None:
    """Arrow IPC file (random-access format) of ``batches``; slices are written as their rows only."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)


def read_ipc_file(path: str | os.PathLike, schema: pa.Schema) -> list[pa.RecordBatch]:
    """The record batches of an Arrow IPC file, read into memory; TypeError if its schema is not ``schema``."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        if not reader.schema.equals(schema):
            raise TypeError(f"{path}: schema differs from the expected one:\n{reader.schema}")
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
