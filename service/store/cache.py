"""Records this process wrote or read lately, kept as hints so that the next write of a stream
can skip reading it back.

Why: a steady-state record is about 140 KB (state, accuracy window, duplicate window), and
reading it from Redis before every write (the round trip, hiredis, decoding the fields) was a
fifth of the service's CPU per observation, while it nearly always returned what this very
process had written a moment before. A hint is never trusted on its own: the compare-and-set
that writes the next record checks the version and incarnation the hint carries, so a hint
another replica made stale costs one recomputation from a fresh read
(:func:`~service.store.base.update_stream`, ``service.bulk``), and an answer that writes
nothing (every observation a duplicate) is only given from a fresh read. Reads that answer a
client (``GET``) never use it.

Least recently used entries go first once ``max_bytes`` (the records' encoded size) is
exceeded; ``hits``/``misses`` say whether it holds the working set (``/metrics``).
"""

from __future__ import annotations

from collections import OrderedDict

from service.store.base import StreamRecord


class RecordCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[StreamRecord, int]] = OrderedDict()
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
        self._entries.move_to_end(stream_id)
        return entry[0]

    def put(self, record: StreamRecord, nbytes: int) -> None:
        """Keep ``record`` (``nbytes``: its encoded size), replacing the stream's older one."""
        self.drop(record.stream_id)
        if nbytes > self.max_bytes:
            return
        self._entries[record.stream_id] = (record, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, n) = self._entries.popitem(last=False)
            self._bytes -= n

    def drop(self, stream_id: str) -> None:
        entry = self._entries.pop(stream_id, None)
        if entry is not None:
            self._bytes -= entry[1]
