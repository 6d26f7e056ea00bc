"""The state store contract: one record per stream, read-modify-write by compare-and-set.

A :class:`StreamRecord` is immutable. Writers read a record, compute the next one off the
event loop and ask the store to replace it only if its version is still the one they read
(:meth:`StateStore.compare_and_set`); :func:`update_stream` retries a lost race with jittered
backoff, so concurrent writers never lose an update.

Versions start again at 1 when a stream is deleted and created anew, so the version alone
cannot tell a stream from its re-creation (the ABA problem): a write computed from the deleted
stream would land on the new one. Every creation therefore draws a random ``incarnation``
token, and a compare-and-set must match both the version and the incarnation it read; a
different incarnation means the stream it read is gone (``StreamNotFound``). Nothing is pickled: the state is the
``models.state_io`` safetensors blob and every other field is a string, a number or JSON.

Every write re-encodes the whole record and every read decodes it, and a stream's record holds
tens of kilobytes of JSON once its accuracy window and duplicate window are full, so the JSON
fields go through orjson (measured: ``bench/codec.py``); the bytes are standard JSON either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from service.errors import ServiceError, StoreContention, StreamNotFound
from service.store.recent import RecentWindow, Timestamp


@dataclass(frozen=True)
class StreamRecord:
    stream_id: str
    state: bytes  # models.state_io safetensors blob
    model: str
    fingerprint: str
    mode: str
    schema_version: str
    steps: int = 0  # observations learned from (== the state's count)
    last_timestamp: Timestamp | None = None
    last_values_hash: str | None = None
    # (timestamp, values hash) of the latest applied observations, oldest first: duplicates
    # of any of them are acknowledged without being learned from again (a sequence of pairs
    # given here is held as a RecentWindow: see service/store/recent.py)
    recent: RecentWindow = RecentWindow()
    freq: str | None = None
    forecast: tuple[tuple[float, ...], ...] | None = None  # in the stream's units
    accuracy: dict[str, Any] | None = None  # service.accuracy.Accuracy as JSON; None: nothing scored yet
    intervals: dict[str, Any] | None = (
        None  # service.intervals as JSON (levels, learned radii); None: defaults
    )
    created_at: str = ""
    updated_at: str = ""
    version: int = 0
    incarnation: str = ""  # random per creation, set by the store: see the module docstring

    def __post_init__(self) -> None:
        if not isinstance(self.recent, RecentWindow):
            object.__setattr__(self, "recent", RecentWindow(self.recent))

    def replace(self, **changes: Any) -> StreamRecord:
        return dataclasses.replace(self, **changes)

    # flat string fields, for stores that keep a hash per stream
    def to_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "state":
                fields[f.name] = value
            elif f.name == "recent":
                fields[f.name] = value.to_json().decode()
            else:
                fields[f.name] = orjson.dumps(value).decode()
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> StreamRecord:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = fields.get(f.name.encode())
            if raw is None and f.default is not dataclasses.MISSING:
                continue  # a field newer than the stored record (incarnation, accuracy): its default
            if raw is None:
                raise ValueError(f"stream record without its {f.name!r} field")
            if f.name == "state":
                values[f.name] = raw
            elif f.name == "recent":
                values[f.name] = RecentWindow.from_json(raw)  # decoded when read
            else:
                values[f.name] = orjson.loads(raw)
        if values["forecast"] is not None:
            values["forecast"] = tuple(tuple(row) for row in values["forecast"])
        return cls(**values)


@dataclass(frozen=True)
class Snapshot:
    """A named copy of a stream's record, as it was when taken."""

    name: str
    taken_at: str
    record: StreamRecord

    def meta(self) -> str:
        """Everything but the state blob, as JSON."""
        fields = {k: v for k, v in self.record.to_fields().items() if k != "state"}
        return json.dumps({"name": self.name, "taken_at": self.taken_at, "record": fields})

    @classmethod
    def from_parts(cls, meta: bytes | str, state: bytes) -> Snapshot:
        data = json.loads(meta)
        fields = {k.encode(): v.encode() for k, v in data["record"].items()}
        fields[b"state"] = state
        return cls(data["name"], data["taken_at"], StreamRecord.from_fields(fields))


WriteOutcome = StreamRecord | StreamNotFound | None


class StateStore(Protocol):
    """What the engine needs from a store; both stores give the same guarantees."""

    async def create(self, record: StreamRecord) -> StreamRecord:
        """Store a new stream at version 1 with a fresh incarnation; ``StreamExists`` if the id
        is taken."""
        ...

    async def get(self, stream_id: str) -> StreamRecord:
        """The current record; ``StreamNotFound`` if there is none."""
        ...

    def hint(self, stream_id: str) -> StreamRecord | None:
        """The stream's record as this process last wrote or read it, perhaps stale since
        (``service.store.cache``); ``None`` when the store keeps none (the embedded store, whose
        reads cost nothing). Only a compare-and-set may act on it: see :func:`update_stream`."""
        ...

    async def compare_and_set(self, record: StreamRecord, expected_version: int) -> StreamRecord | None:
        """Replace the record if its version is still ``expected_version`` and its incarnation
        is still ``record.incarnation``; return the stored record (version + 1), ``None`` when
        another writer got there first, or raise ``StreamNotFound`` when the stream was deleted
        meanwhile (and perhaps created again: another incarnation)."""
        ...

    async def delete(self, stream_id: str) -> None: ...

    async def list_ids(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """A page of stream ids from ``cursor`` (``None``: the first page) and the cursor of the
        next page (``None``: no more). The embedded store pages in id order, ``limit`` at a time;
        the Redis store follows ``SCAN`` (about ``limit`` per page, in no particular order)."""
        ...

    async def delete_if_unchanged(self, record: StreamRecord) -> bool:
        """Delete the stream and its snapshots only if its version and incarnation are still
        ``record``'s (the expiry sweep's compare-and-set); ``False`` when it was written,
        re-created or deleted since."""
        ...

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` with its stream; ``SnapshotExists`` if the name is taken,
        ``StreamNotFound`` if the stream is gone. Deleting the stream deletes its snapshots."""
        ...

    async def get_snapshot(self, stream_id: str, name: str) -> Snapshot:
        """``SnapshotNotFound`` if there is none of that name."""
        ...

    async def list_snapshots(self, stream_id: str) -> list[Snapshot]:
        """The stream's snapshots (their records without the state blob), by name."""
        ...

    async def delete_snapshot(self, stream_id: str, name: str) -> None: ...

    async def get_many(self, stream_ids: Sequence[str]) -> list[StreamRecord | None]:
        """The current record of each stream (``None`` where there is none), in one round trip."""
        ...

    async def confirm_many(self, hints: Sequence[StreamRecord]) -> list[StreamRecord | None]:
        """The current record of each hint's stream (``None`` where there is none), in one round
        trip: the hint itself where its version and incarnation are still the stored ones, so
        that a hint kept by this process is checked without reading the record again."""
        ...

    async def write_many(self, writes: Sequence[tuple[StreamRecord, int]]) -> list[WriteOutcome]:
        """Compare-and-set each ``(record, expected_version)`` (as :meth:`compare_and_set`; an
        expected version 0 creates the stream if absent, with a fresh incarnation), in one round
        trip; each write is atomic on its own and touches only its own stream. Per write: the
        stored record, ``None`` for a lost race (or a stream created meanwhile), or
        ``StreamNotFound`` (the stream was deleted or re-created)."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""
        ...

    async def aclose(self) -> None: ...


class StoreStats(Protocol):
    def conflict(self) -> None: ...
    def retry(self) -> None: ...


def new_incarnation() -> str:
    """A token no other creation of any stream will draw (122 random bits)."""
    return uuid.uuid4().hex


T = TypeVar("T")
Change = Callable[[StreamRecord], Awaitable[tuple[StreamRecord | None, T]]]


async def update_stream(
    store: StateStore,
    stream_id: str,
    change: Change[T],
    *,
    attempts: int,
    stats: StoreStats | None = None,
    base_delay: float = 0.002,
    max_delay: float = 0.1,
) -> tuple[StreamRecord | None, T]:
    """Atomic read-modify-write of one stream.

    ``change(current)`` returns ``(next_record or None, result)``; ``None`` means nothing to
    write (for example a batch of duplicates). A lost compare-and-set is retried from a fresh
    read, at most ``attempts`` times in all, then ``StoreContention`` (503) is raised; no
    partial state is ever written because each attempt writes one whole record or nothing.

    The first attempt starts from the store's :meth:`~StateStore.hint` when it has one (no
    read). A hint is checked by the compare-and-set like any read; one that may be stale (the
    write is refused, nothing was to be written, or ``change`` refused the request: each is
    answered only from a fresh read) is followed by a fresh read at once, without counting as
    a lost race.
    """
    trust_hint = True
    attempt = 0
    while attempt < attempts:
        current = store.hint(stream_id) if trust_hint else None
        hinted, trust_hint = current is not None, False
        if current is None:
            current = await store.get(stream_id)
        try:
            new, result = await change(current)
        except ServiceError:
            if hinted:  # (a reset elsewhere, say): the refusal must come from the stream as it is
                continue
            raise
        if new is None:
            if hinted:
                continue
            return current, result
        try:
            stored = await store.compare_and_set(new, current.version)
        except StreamNotFound:
            if hinted:
                continue
            raise
        if stored is not None:
            return stored, result
        if hinted:
            continue
        if stats:
            stats.conflict()
        attempt += 1
        if attempt < attempts:
            if stats:
                stats.retry()
            await asyncio.sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise StoreContention(f"stream {stream_id!r} is being updated concurrently; try again")
