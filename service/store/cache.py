"""Records this process wrote or read lately, kept as hints so that the next write of a stream
can skip reading it back.

Why: a steady-state record is about 140 KB (state, accuracy window, duplicate window), and
reading it from Redis before every write (the round trip, hiredis, decoding the fields) was a
quarter of the event loop's CPU per bulk observation (``bench.bulk``: 1.43 -> 1.07 ms without
it), while it nearly always returned what this very process had written a moment before. A hint is never trusted on its own: the compare-and-set
that writes the next record checks the version and incarnation the hint carries, so a hint
another replica made stale costs one recomputation from a fresh read
(:func:`~service.store.base.update_stream`), and an answer that writes nothing (every
observation a duplicate) is only given from a fresh read. A bulk request (``service.bulk``)
confirms its hints before computing (``StateStore.confirm_many``: a check of two small fields
per stream, the record read only where it is stale), so that with several server processes,
each holding the streams it served last, a stale hint costs a read, not a wasted model step.
Reads that answer a client (``GET``) never use it.

When a record does not fit in ``max_bytes`` (the records' encoded size), the entries written
longest ago make room only if that was more than ``min_age_s`` ago; otherwise the new record is
not kept. Why not plain LRU: a fleet posts every stream once per tick, a cycle over more streams
than fit, and LRU would then evict each record just before its next use (no hits, and the
churn costs a little). This way a fixed part of the fleet stays and hits, and streams that went
quiet still age out. ``hits``/``misses`` say how much of the working set it holds (``/metrics``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from service.store.base import StreamRecord


class RecordCache:
    def __init__(
        self, max_bytes: int, min_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes, self.min_age_s, self._clock = max_bytes, min_age_s, clock
        self._entries: OrderedDict[str, tuple[StreamRecord, int, float]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, stream_id: str) -> StreamRecord | None:
        entry = self._entries.get(stream_id)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def put(self, record: StreamRecord, nbytes: int) -> None:
        """Keep ``record`` (``nbytes``: its encoded size), replacing the stream's older one, if
        it fits once entries written more than ``min_age_s`` ago are evicted (oldest first)."""
        self.drop(record.stream_id)
        now = self._clock()
        while self._bytes + nbytes > self.max_bytes and self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest[2] < self.min_age_s:
                return  # everything kept is in use: this one is not kept
            _, (_, n, _) = self._entries.popitem(last=False)
            self._bytes -= n
        if self._bytes + nbytes > self.max_bytes:
            return
        self._entries[record.stream_id] = (record, nbytes, now)
        self._bytes += nbytes

    def drop(self, stream_id: str) -> None:
        entry = self._entries.pop(stream_id, None)
        if entry is not None:
            self._bytes -= entry[1]
