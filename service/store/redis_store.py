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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from service.errors import StoreUnavailable, StreamExists, StreamNotFound
from service.store.base import StreamRecord, new_incarnation

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


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "memcast", timeout_s: float = 2.0, retry_after: int = 1):
        # One immediate retry lets a pooled connection broken by a Redis restart reconnect
        # within the same call; a Redis that is down fails fast instead of backing off.
        self._redis = _client(url, timeout_s, Retry(NoBackoff(), 1))
        self._prefix = prefix
        self._retry_after = retry_after
        self._create = self._redis.register_script(_CREATE)
        self._cas = self._redis.register_script(_COMPARE_AND_SET)

    @property
    def scripts(self) -> tuple[AsyncScript, ...]:
        """Every server-side script this store runs; each names its stream's key alone."""
        return (self._create, self._cas)

    def key(self, stream_id: str) -> str:
        return f"{self._prefix}:{{{stream_id}}}"

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

    async def create(self, record: StreamRecord) -> StreamRecord:
        stored = record.replace(version=1, incarnation=new_incarnation())
        async with self._translate():
            created = await self._create(keys=[self.key(record.stream_id)], args=_flatten(stored))
        if not created:
            raise StreamExists(record.stream_id)
        return stored

    async def get(self, stream_id: str) -> StreamRecord:
        async with self._translate():
            fields = await self._redis.hgetall(self.key(stream_id))
        if not fields:
            raise StreamNotFound(stream_id)
        return StreamRecord.from_fields(cast(dict[bytes, bytes], fields))  # a client without decode_responses

    async def compare_and_set(self, record: StreamRecord, expected_version: int) -> StreamRecord | None:
        stored = record.replace(version=expected_version + 1)
        async with self._translate():
            outcome = await self._cas(
                keys=[self.key(record.stream_id)],
                args=[json.dumps(expected_version), json.dumps(record.incarnation), *_flatten(stored)],
            )
        if outcome == -1:
            raise StreamNotFound(record.stream_id)
        return stored if outcome == 1 else None

    async def delete(self, stream_id: str) -> None:
        async with self._translate():
            removed = await self._redis.delete(self.key(stream_id))
        if not removed:
            raise StreamNotFound(stream_id)

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
