"""The embedded in-process store: the default for a single process (no MEMCAST_REDIS_URL).

Records are immutable, so a dict guarded by a lock gives the Redis store's guarantees:
create-if-absent, compare-and-set (version and incarnation) and delete are each atomic, across event-loop
tasks and threads alike. State does not survive the process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from service.errors import SnapshotExists, SnapshotNotFound, StreamExists, StreamNotFound
from service.store.base import Snapshot, StreamRecord, WriteOutcome, new_incarnation


class EmbeddedStore:
    def __init__(self) -> None:
        self._records: dict[str, StreamRecord] = {}
        self._snapshots: dict[str, dict[str, Snapshot]] = {}
        self._lock = threading.Lock()

    async def create(self, record: StreamRecord) -> StreamRecord:
        stored = record.replace(version=1, incarnation=new_incarnation())
        with self._lock:
            if record.stream_id in self._records:
                raise StreamExists(record.stream_id)
            self._records[record.stream_id] = stored
        return stored

    def hint(self, stream_id: str) -> StreamRecord | None:
        return None  # a read is a dictionary lookup: nothing to save

    async def get(self, stream_id: str) -> StreamRecord:
        with self._lock:
            record = self._records.get(stream_id)
        if record is None:
            raise StreamNotFound(stream_id)
        return record

    async def compare_and_set(self, record: StreamRecord, expected_version: int) -> StreamRecord | None:
        stored = record.replace(version=expected_version + 1)
        with self._lock:
            current = self._records.get(record.stream_id)
            if current is None or current.incarnation != record.incarnation:
                raise StreamNotFound(record.stream_id)
            if current.version != expected_version:
                return None
            self._records[record.stream_id] = stored
        return stored

    async def get_many(self, stream_ids: Sequence[str]) -> list[StreamRecord | None]:
        with self._lock:
            return [self._records.get(stream_id) for stream_id in stream_ids]

    async def confirm_many(self, hints: Sequence[StreamRecord]) -> list[StreamRecord | None]:
        return await self.get_many([hint.stream_id for hint in hints])

    async def write_many(self, writes: Sequence[tuple[StreamRecord, int]]) -> list[WriteOutcome]:
        outcomes: list[WriteOutcome] = []
        with self._lock:
            for record, expected in writes:
                current = self._records.get(record.stream_id)
                if expected == 0:
                    stored = record.replace(version=1, incarnation=new_incarnation())
                    ok = current is None
                elif current is None or current.incarnation != record.incarnation:
                    outcomes.append(StreamNotFound(record.stream_id))
                    continue
                else:
                    stored = record.replace(version=expected + 1)
                    ok = current.version == expected
                if ok:
                    self._records[record.stream_id] = stored
                outcomes.append(stored if ok else None)
        return outcomes

    async def delete(self, stream_id: str) -> None:
        with self._lock:
            self._snapshots.pop(stream_id, None)
            if self._records.pop(stream_id, None) is None:
                raise StreamNotFound(stream_id)

    async def list_ids(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        with self._lock:
            ids = sorted(i for i in self._records if cursor is None or i > cursor)
        page = ids[:limit]
        return page, page[-1] if len(ids) > limit else None

    async def delete_if_unchanged(self, record: StreamRecord) -> bool:
        stream_id = record.stream_id
        with self._lock:
            current = self._records.get(stream_id)
            if current is None or (current.version, current.incarnation) != (
                record.version,
                record.incarnation,
            ):
                return False
            del self._records[stream_id]
            self._snapshots.pop(stream_id, None)
        return True

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        stream_id = snapshot.record.stream_id
        with self._lock:
            if stream_id not in self._records:
                raise StreamNotFound(stream_id)
            taken = self._snapshots.setdefault(stream_id, {})
            if snapshot.name in taken:
                raise SnapshotExists(snapshot.name)
            taken[snapshot.name] = snapshot

    async def get_snapshot(self, stream_id: str, name: str) -> Snapshot:
        with self._lock:
            snapshot = self._snapshots.get(stream_id, {}).get(name)
        if snapshot is None:
            raise SnapshotNotFound(name)
        return snapshot

    async def list_snapshots(self, stream_id: str) -> list[Snapshot]:
        with self._lock:
            taken = dict(self._snapshots.get(stream_id, {}))
        return [taken[name] for name in sorted(taken)]

    async def delete_snapshot(self, stream_id: str, name: str) -> None:
        with self._lock:
            if self._snapshots.get(stream_id, {}).pop(name, None) is None:
                raise SnapshotNotFound(name)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)
