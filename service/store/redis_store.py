"""The Redis store (redis.asyncio): one hash per stream, compare-and-set in a Lua script.

Key: ``{prefix}:{<stream_id>}``; the braces are a cluster hash tag, so everything about a
stream lives in one slot. A ``redis+cluster://host:port`` (or ``rediss+cluster://``) URL
selects redis-py's cluster client, which finds the other nodes from that one; every script
below names its stream's key alone (``KEYS[1]``), so it runs on the node owning that slot.
Hash fields: ``state`` (the safetensors blob) and the JSON-encoded metadata of :class:`~service.store.base.StreamRecord` (schema version, model, fingerprint,
mode, steps, last timestamp and values hash, recent duplicates window, frequency, forecast,
created/updated times, version, incarnation).

Every write is one server-side script, so a record is replaced whole or not at all: the
compare-and-set script checks the ``version`` and ``incarnation`` fields (see
:mod:`service.store.base` on why both) and writes every field in one step; it touches only the
stream's own key.
redis-py errors become :class:`~service.errors.StoreUnavailable` here and nowhere else. The
client keeps no dead connection: redis-py drops a broken one and reconnects on the next call.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from service.errors import (
    InvalidObservation,
    SnapshotExists,
    SnapshotNotFound,
    StoreUnavailable,
    StreamExists,
    StreamNotFound,
)
from service.store.base import Snapshot, StreamRecord, WriteOutcome, new_incarnation
from service.store.cache import RecordCache

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# ARGV: expected version, expected incarnation (both JSON-encoded, as stored), then the
# fields. A record written before incarnations existed has none: '""' (the empty string).
_COMPARE_AND_SET = """
local current = redis.call('HMGET', KEYS[1], 'version', 'incarnation')
if not current[1] then return -1 end
if (current[2] or '""') ~= ARGV[2] then return -1 end
if current[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""

# ARGV: the version and incarnation of the record this process holds (JSON-encoded, as
# stored): 1 while they are still the stored ones, else the stored fields (0: no stream)
_READ_IF_CHANGED = """
local current = redis.call('HMGET', KEYS[1], 'version', 'incarnation')
if not current[1] then return 0 end
if current[1] == ARGV[1] and (current[2] or '""') == ARGV[2] then return 1 end
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: the version and incarnation read (JSON-encoded, as stored): a stream written or
# re-created since is kept
_DELETE_IF_UNCHANGED = """
local current = redis.call('HMGET', KEYS[1], 'version', 'incarnation')
if current[1] ~= ARGV[1] or (current[2] or '""') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# snapshots: hash ``{prefix}:{<id>}:snapshots`` (same slot), fields ``<name>.meta`` and ``<name>.state``
_PUT_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""

# The bulk write: the compare-and-set above, or with expected version 0 a create-if-absent
# (0: the id is taken, re-read it). ARGV as for _COMPARE_AND_SET.
_WRITE = """
if ARGV[1] == '0' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  return 1
end
local current = redis.call('HMGET', KEYS[1], 'version', 'incarnation')
if not current[1] then return -1 end
if (current[2] or '""') ~= ARGV[2] then return -1 end
if current[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""


# KEYS: the stream's record and its snapshots (one slot): both go at once, on a cluster too
_DELETE = """
local removed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return removed
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "memcast",
        timeout_s: float = 2.0,
        retry_after: int = 1,
        cache_bytes: int = 0,
    ):
        # One immediate retry lets a pooled connection broken by a Redis restart reconnect
        # within the same call; a Redis that is down fails fast instead of backing off.
        self._redis = _client(url, timeout_s, Retry(NoBackoff(), 1))
        self._prefix = prefix
        self._retry_after = retry_after
        self._create = self._redis.register_script(_CREATE)
        self._cas = self._redis.register_script(_COMPARE_AND_SET)
        self._put_snapshot = self._redis.register_script(_PUT_SNAPSHOT)
        self._delete_if_unchanged = self._redis.register_script(_DELETE_IF_UNCHANGED)
        self._write = self._redis.register_script(_WRITE)
        self._delete = self._redis.register_script(_DELETE)
        self._read_if_changed = self._redis.register_script(_READ_IF_CHANGED)
        # a cluster client refuses scripts in pipelines and scans node by node
        self._cluster = isinstance(self._redis, aioredis.RedisCluster)
        # hints for the next write (service/store/cache.py); 0: every write reads first
        self.cache = RecordCache(cache_bytes) if cache_bytes > 0 else None

    @property
    def scripts(self) -> tuple[AsyncScript, ...]:
        """Every server-side script this store runs; each names its stream's key alone."""
        return (
            self._create,
            self._cas,
            self._write,
            self._delete,
            self._delete_if_unchanged,
            self._put_snapshot,
            self._read_if_changed,
        )

    def key(self, stream_id: str) -> str:
        return f"{self._prefix}:{{{stream_id}}}"

    def snapshots_key(self, stream_id: str) -> str:  # not ending in "}": list_ids never sees it
        return f"{self.key(stream_id)}:snapshots"

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"state store unavailable: {exc}", retry_after=self._retry_after) from exc
        except (AttributeError, TypeError) as exc:
            if not _raised_in_client(exc):
                raise  # a bug of ours, never taken for an outage
            raise StoreUnavailable(
                f"state store unavailable: {exc!r}", retry_after=self._retry_after
            ) from exc

    def hint(self, stream_id: str) -> StreamRecord | None:
        return self.cache.get(stream_id) if self.cache is not None else None

    def _remember(self, record: StreamRecord, args: Sequence[bytes | str]) -> None:
        if self.cache is not None:
            self.cache.put(record, sum(map(len, args)))

    def _forget(self, stream_id: str) -> None:
        if self.cache is not None:
            self.cache.drop(stream_id)

    async def create(self, record: StreamRecord) -> StreamRecord:
        stored = record.replace(version=1, incarnation=new_incarnation())
        args = _flatten(stored)
        async with self._translate():
            created = await self._create(keys=[self.key(record.stream_id)], args=args)
        if not created:
            raise StreamExists(record.stream_id)
        self._remember(stored, args)
        return stored

    async def get(self, stream_id: str) -> StreamRecord:
        async with self._translate():
            fields = await self._redis.hgetall(self.key(stream_id))
        if not fields:
            self._forget(stream_id)
            raise StreamNotFound(stream_id)
        return self._read(cast(dict[bytes, bytes], fields))  # a client without decode_responses

    def _read(self, fields: dict[bytes, bytes]) -> StreamRecord:
        record = StreamRecord.from_fields(fields)
        if self.cache is not None:
            self.cache.put(record, sum(len(k) + len(v) for k, v in fields.items()))
        return record

    async def compare_and_set(self, record: StreamRecord, expected_version: int) -> StreamRecord | None:
        stored = record.replace(version=expected_version + 1)
        fields = _flatten(stored)
        async with self._translate():
            outcome = await self._cas(
                keys=[self.key(record.stream_id)],
                args=[json.dumps(expected_version), json.dumps(record.incarnation), *fields],
            )
        if outcome != 1:
            self._forget(record.stream_id)
        if outcome == -1:
            raise StreamNotFound(record.stream_id)
        if outcome == 1:
            self._remember(stored, fields)
        return stored if outcome == 1 else None

    async def get_many(self, stream_ids: Sequence[str]) -> list[StreamRecord | None]:
        """One pipeline of HGETALLs (no transaction: each stream is read on its own)."""
        async with self._translate():
            pipe = self._redis.pipeline(transaction=False)
            for stream_id in stream_ids:
                pipe.hgetall(self.key(stream_id))
            replies = await pipe.execute()
        records: list[StreamRecord | None] = []
        for stream_id, fields in zip(stream_ids, replies, strict=True):
            if not fields:
                self._forget(stream_id)
            records.append(self._read(fields) if fields else None)
        return records

    async def write_many(self, writes: Sequence[tuple[StreamRecord, int]]) -> list[WriteOutcome]:
        """One pipeline of per-stream write scripts (:meth:`_run_many`)."""
        stored = [
            r.replace(version=1, incarnation=new_incarnation()) if v == 0 else r.replace(version=v + 1)
            for r, v in writes
        ]
        commands = [
            (
                self.key(r.stream_id),
                json.dumps(v),
                json.dumps(s.incarnation if v == 0 else r.incarnation),
                _flatten(s),
            )
            for (r, v), s in zip(writes, stored, strict=True)
        ]
        replies = await self._run_many(
            self._write,
            [(key, [version, incarnation, *fields]) for key, version, incarnation, fields in commands],
        )
        outcomes: list[WriteOutcome] = []
        for (record, _), reply, new, command in zip(writes, replies, stored, commands, strict=True):
            if reply == 1:
                self._remember(new, command[3])
            else:
                self._forget(record.stream_id)
            if reply == -1:
                outcomes.append(StreamNotFound(record.stream_id))
            else:
                outcomes.append(new if reply == 1 else None)
        return outcomes

    async def confirm_many(self, hints: Sequence[StreamRecord]) -> list[StreamRecord | None]:
        """One pipeline of per-stream scripts that answer 1 for a hint still current and the
        record's fields otherwise: a check of two small fields where a read would move the
        whole record (about 140 KB) and decode it."""
        replies = await self._run_many(
            self._read_if_changed,
            [(self.key(h.stream_id), [json.dumps(h.version), json.dumps(h.incarnation)]) for h in hints],
        )
        records: list[StreamRecord | None] = []
        for hint, reply in zip(hints, replies, strict=True):
            if reply == 1:
                records.append(hint)
            elif not reply:
                self._forget(hint.stream_id)
                records.append(None)
            else:
                flat = cast(list[bytes], reply)
                records.append(self._read(dict(zip(flat[::2], flat[1::2], strict=True))))
        return records

    async def _run_many(
        self, script: AsyncScript, calls: Sequence[tuple[str, Sequence[bytes | str]]]
    ) -> list[object]:
        """``script`` once per ``(key, args)``, in one pipeline sent as EVALSHA (a Redis that lost
        its script cache answers NOSCRIPT for a command it did not run: those are loaded and
        sent again); on a cluster, one call per key, all in flight at once."""
        if self._cluster:
            async with self._translate():
                answers = await asyncio.gather(
                    *(script(keys=[key], args=list(args)) for key, args in calls), return_exceptions=True
                )
            for answer in answers:
                if isinstance(answer, BaseException):
                    async with self._translate():
                        raise answer
            return list(answers)
        pending = list(range(len(calls)))
        replies: list[object] = [None] * len(calls)
        async with self._translate():
            for _ in range(2 if pending else 0):
                pipe = self._redis.pipeline(transaction=False)
                for i in pending:
                    key, args = calls[i]
                    pipe.evalsha(script.sha, 1, key, *args)
                answers = await pipe.execute(raise_on_error=False)
                for i, answer in zip(pending, answers, strict=True):
                    replies[i] = answer
                pending = [i for i in pending if isinstance(replies[i], NoScriptError)]
                if not pending:
                    break
                await self._redis.script_load(script.script)
            for answer in replies:
                if isinstance(answer, Exception):
                    raise answer
        return replies

    async def delete(self, stream_id: str) -> None:
        self._forget(stream_id)
        async with self._translate():
            removed = await self._delete(keys=[self.key(stream_id), self.snapshots_key(stream_id)])
        if not removed:
            raise StreamNotFound(stream_id)

    async def list_ids(self, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """``SCAN`` over this service's keys (``{prefix}:{*}``), never ``KEYS``: pages of about
        ``limit`` ids; the cursor is Redis's own (on a cluster: the last id, see below)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._prefix) + ":{*}"
        start = len(self._prefix) + 2
        if self._cluster:
            return await self._list_cluster_ids(pattern, start, cursor, limit)
        try:
            position = int(cursor or 0)
        except ValueError:
            raise InvalidObservation(
                "cursor is not one this endpoint returned", field="query.cursor"
            ) from None
        ids: list[str] = []
        async with self._translate():
            while True:
                position, keys = await self._redis.scan(position, match=pattern, count=limit)
                ids += [(key if isinstance(key, str) else key.decode())[start:-1] for key in keys]
                if position == 0 or len(ids) >= limit:
                    break
        return ids, str(position) if position else None

    async def _list_cluster_ids(
        self, pattern: str, start: int, cursor: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """On a cluster every primary is scanned (``scan_iter``) and the ids are paged in id
        order, the cursor being the last id returned: a whole scan per page, which suits an
        operator's listing, not a hot path."""
        async with self._translate():
            keys = [k async for k in self._redis.scan_iter(match=pattern, count=1000)]
        ids = sorted({(k if isinstance(k, str) else k.decode())[start:-1] for k in keys})
        ids = [i for i in ids if cursor is None or i > cursor]
        page = ids[:limit]
        return page, page[-1] if len(ids) > limit else None

    async def delete_if_unchanged(self, record: StreamRecord) -> bool:
        stream_id = record.stream_id
        self._forget(stream_id)
        async with self._translate():
            deleted = await self._delete_if_unchanged(
                keys=[self.key(stream_id), self.snapshots_key(stream_id)],
                args=[json.dumps(record.version), json.dumps(record.incarnation)],
            )
        return bool(deleted)

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        stream_id, name = snapshot.record.stream_id, snapshot.name
        async with self._translate():
            outcome = await self._put_snapshot(
                keys=[self.key(stream_id), self.snapshots_key(stream_id)],
                args=[f"{name}.meta", snapshot.meta(), f"{name}.state", snapshot.record.state],
            )
        if outcome == -1:
            raise StreamNotFound(stream_id)
        if outcome == 0:
            raise SnapshotExists(name)

    async def get_snapshot(self, stream_id: str, name: str) -> Snapshot:
        async with self._translate():
            meta, state = await self._redis.hmget(
                self.snapshots_key(stream_id), [f"{name}.meta", f"{name}.state"]
            )
        if meta is None or state is None:
            raise SnapshotNotFound(name)
        return Snapshot.from_parts(meta, state if isinstance(state, bytes) else state.encode())

    async def list_snapshots(self, stream_id: str) -> list[Snapshot]:
        key = self.snapshots_key(stream_id)
        async with self._translate():
            fields = [f.decode() if isinstance(f, bytes) else f for f in await self._redis.hkeys(key)]
            metas = sorted(f for f in fields if f.endswith(".meta"))
            values = await self._redis.hmget(key, metas) if metas else []
        return [Snapshot.from_parts(v, b"") for v in values if v is not None]

    async def delete_snapshot(self, stream_id: str, name: str) -> None:
        async with self._translate():
            removed = await self._redis.hdel(self.snapshots_key(stream_id), f"{name}.meta", f"{name}.state")
        if not removed:
            raise SnapshotNotFound(name)

    async def ping(self) -> None:
        async with self._translate():
            await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


# redis-py's asyncio clients can fail with AttributeError or TypeError when a connection is
# torn down while another command uses it (redis/redis-py#3546, #3835; here: the cluster client
# while a master restarts, `'NoneType' object has no attribute 'writelines'`). Such an error is
# a connection failure whose command may or may not have run, as a timeout is: a 503.
_CLIENT_CODE = (Path(redis.__file__).parent, Path(asyncio.__file__).parent)


def _raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in redis-py or the asyncio streams under it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    origin = Path(tb.tb_frame.f_code.co_filename)
    return any(origin.is_relative_to(code) for code in _CLIENT_CODE)


_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _client(url: str, timeout_s: float, retry: Retry) -> aioredis.Redis | aioredis.RedisCluster:
    """redis-py's cluster client for a ``redis+cluster://`` URL, its single-node client else."""
    scheme, _, rest = url.partition("://")
    if scheme in _CLUSTER_SCHEMES:
        return aioredis.RedisCluster.from_url(
            f"{_CLUSTER_SCHEMES[scheme]}://{rest}",
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
        )
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry
    )


def _flatten(record: StreamRecord) -> list[bytes | str]:
    args: list[bytes | str] = []
    for name, value in record.to_fields().items():
        args += [name, value]
    return args
