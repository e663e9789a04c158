"""Time-ordered ids for jobs and runs: UUIDv7 (RFC 9562).

A random uuid4 lands anywhere in the id indexes of `jobs` and `job_history`, so at a
few million rows a day every insert touches a different cold page; a UUIDv7 starts
with its creation time in milliseconds and lands at the right edge, in pages already
in memory. Python gains uuid.uuid7 in 3.14; this is the same layout (RFC 9562,
method 3: 12 bits of sub-millisecond time, then 62 random bits).
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62


def new_id() -> uuid.UUID:
    nanoseconds = time.time_ns()
    milliseconds, rest = divmod(nanoseconds, 1_000_000)
    sub_millisecond = rest * 4096 // 1_000_000  # 12 bits
    random = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    return uuid.UUID(int=(milliseconds & ((1 << 48) - 1)) << 80 | _VERSION_7
                     | sub_millisecond << 64 | _VARIANT_RFC | random)

