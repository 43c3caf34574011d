"""The one process-independent hash (Python's ``hash()`` is salted per process).

Used for state hashes of the Arrow rows, request seeds and sampler seeds; the same value on every
machine and run, so seeded rollouts and GiGPO's anchor states are reproducible.
"""

from __future__ import annotations

import hashlib
from typing import Any


def stable_hash(data: Any, *, signed: bool = True) -> int:
    """64-bit blake2b of ``repr(data)``: signed (Arrow ``int64`` columns) or unsigned (RNG seeds)."""
    return int.from_bytes(hashlib.blake2b(repr(data).encode(), digest_size=8).digest(), "little", signed=signed)


def stable_seed(*parts: Any) -> int:
    """An unsigned 64-bit seed from any repr-able parts (``stable_hash(parts, signed=False)``)."""
    return stable_hash(parts, signed=False)
