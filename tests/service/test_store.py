"""The state stores' guarantees, straight through the StateStore protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from memcast.harness import RedisCluster
from service.errors import StoreContention, StoreUnavailable, StreamExists, StreamNotFound
from service.metrics import Metrics
from service.settings import Settings
from service.store import RedisStore, StateStore, StreamRecord, make_store, update_stream
from service.store.base import Snapshot
from tests.conftest import with_cluster


def record(stream_id: str = "s1", **changes: object) -> StreamRecord:
    base = StreamRecord(
        stream_id=stream_id,
        state=b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        model="small",
        fingerprint="f" * 64,
        mode="memory_only",
        schema_version="1",
        recent=((1, "ab"), ("2024-01-01T00:00:00", "cd")),
        forecast=((1.5, 2.25), (3.0, -1.0)),
        freq="h",
    )
    return base.replace(**changes)


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[StateStore]:
    store = make_store(Settings(redis_url=store_url, redis_key_prefix="test"))
    try:
        yield store
    finally:
        await store.aclose()


@with_cluster
async def test_create_get_delete(store: StateStore) -> None:
    created = await store.create(record())
    assert created.version == 1
    assert await store.get("s1") == created
    with pytest.raises(StreamExists):
        await store.create(record(steps=5))
    assert (await store.get("s1")).steps == 0
    await store.delete("s1")
    with pytest.raises(StreamNotFound):
        await store.get("s1")
    with pytest.raises(StreamNotFound):
        await store.delete("s1")


@with_cluster
async def test_compare_and_set(store: StateStore) -> None:
    created = await store.create(record())
    assert created.incarnation  # drawn by the store; a writer carries the one it read
    stored = await store.compare_and_set(created.replace(steps=1), expected_version=1)
    assert stored is not None and stored.version == 2 and (await store.get("s1")) == stored
    assert await store.compare_and_set(created.replace(steps=99), expected_version=1) is None  # lost the race
    assert (await store.get("s1")).steps == 1
    await store.delete("s1")
    with pytest.raises(StreamNotFound):
        await store.compare_and_set(stored.replace(steps=2), expected_version=2)


@with_cluster
async def test_compare_and_set_recreated_stream_refused(store: StateStore) -> None:
    """A write computed from a deleted stream must not land on its re-creation, though the new
    stream has the version the writer read (the ABA problem)."""
    read = await store.create(record(steps=7))
    await store.delete("s1")
    recreated = await store.create(record(mode="none", freq="2h"))
    assert recreated.version == read.version == 1
    with pytest.raises(StreamNotFound):
        await store.compare_and_set(read.replace(steps=1007), expected_version=read.version)
    assert await store.get("s1") == recreated
    stored = await store.compare_and_set(recreated.replace(steps=1), expected_version=1)
    assert stored is not None and stored.steps == 1 and stored.mode == "none"


@with_cluster
async def test_update_stream_concurrent_writers_lose_nothing(store: StateStore) -> None:
    """50 writers read, yield to each other, then write: without the version check most
    increments would be lost."""
    await store.create(record())
    metrics = Metrics()

    async def increment(current: StreamRecord) -> tuple[StreamRecord, int]:
        await asyncio.sleep(0)  # let the others read the same version
        return current.replace(steps=current.steps + 1), current.steps

    results = await asyncio.gather(
        *(
            update_stream(store, "s1", increment, attempts=200, stats=metrics, base_delay=0.0005)
            for _ in range(50)
        )
    )
    final = await store.get("s1")
    assert final.steps == 50 and final.version == 51
    assert sorted(seen for _, seen in results) == list(range(50))  # each saw a distinct predecessor
    assert metrics.store_conflicts._value.get() > 0
    assert metrics.store_retries._value.get() >= metrics.store_conflicts._value.get()


@with_cluster
async def test_update_stream_gives_up_after_attempts(store: StateStore) -> None:
    await store.create(record())

    async def meddle(current: StreamRecord) -> tuple[StreamRecord, None]:
        await store.compare_and_set(current.replace(mode="none"), current.version)  # someone else wins
        return current.replace(steps=current.steps + 100), None

    with pytest.raises(StoreContention) as raised:
        await update_stream(store, "s1", meddle, attempts=3, base_delay=0)
    assert raised.value.headers() == {"Retry-After": "1"}
    assert (await store.get("s1")).steps == 0  # never written


@with_cluster
async def test_update_stream_without_change_writes_nothing(store: StateStore) -> None:
    await store.create(record())

    async def nothing(current: StreamRecord) -> tuple[None, str]:
        return None, "ok"

    stored, result = await update_stream(store, "s1", nothing, attempts=1)
    assert result == "ok" and stored is not None and stored.version == 1


async def test_redis_layout_one_hash_per_stream_with_hash_tag(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="memcast")
    try:
        await store.create(record("stream.7"))
    finally:
        await store.aclose()
    with redis.Redis.from_url(redis_url) as client:
        assert client.keys("*") == [b"memcast:{stream.7}"]
        fields = client.hgetall("memcast:{stream.7}")
    assert fields[b"state"] == record().state  # the safetensors blob, as is
    meta = {k.decode(): json.loads(v) for k, v in fields.items() if k != b"state"}  # the rest is JSON
    assert meta["version"] == 1 and meta["fingerprint"] == "f" * 64 and meta["schema_version"] == "1"
    assert meta["model"] == "small" and meta["mode"] == "memory_only" and meta["freq"] == "h"
    assert meta["recent"] == [[1, "ab"], ["2024-01-01T00:00:00", "cd"]]
    for name in ("steps", "last_timestamp", "last_values_hash", "created_at", "updated_at", "forecast"):
        assert name in meta


async def test_cluster_layout_streams_spread_over_masters_one_slot_each(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    ids = [f"stream.{i}" for i in range(24)]
    store = RedisStore(redis_cluster_url, prefix="memcast")
    try:
        for stream_id in ids:
            created = await store.create(record(stream_id))
            assert await store.compare_and_set(created.replace(steps=3), expected_version=1) is not None
    finally:
        await store.aclose()
    holders: dict[str, int] = {}
    for node in redis_cluster.nodes:
        with node.client() as client:
            for key in client.keys("*"):
                assert key.decode() not in holders, f"{key!r} on two nodes"
                holders[key.decode()] = node.port
                # the hash tag: the key's slot is its stream id's
                stream_id = key.decode().removeprefix("memcast:{").removesuffix("}")
                assert key_slot(key) == key_slot(stream_id.encode())
                assert json.loads(client.hget(key, "steps")) == 3  # both scripts ran on the owner
    assert sorted(holders) == sorted(f"memcast:{{{i}}}" for i in ids)
    assert len(set(holders.values())) == 3, "24 streams should land on all three masters"


async def test_cluster_lua_scripts_keys_in_one_slot(
    redis_cluster: RedisCluster, redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each script call names keys of one slot, its stream's (the control: the cluster refuses a
    script whose keys span two slots, so the contract tests could not pass otherwise)."""
    calls: list[tuple[object, ...]] = []
    original = redis.asyncio.RedisCluster.execute_command

    async def spy(self: redis.asyncio.RedisCluster, *args: object, **kwargs: object) -> object:
        if str(args[0]).upper() in ("EVAL", "EVALSHA"):
            calls.append(args)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.RedisCluster, "execute_command", spy)
    store = RedisStore(redis_cluster_url, prefix="test")
    try:
        for stream_id in ("a", "b.2", "c:3"):
            created = await store.create(record(stream_id))
            stored = await store.compare_and_set(created.replace(steps=1), expected_version=1)
            assert stored is not None
            assert await store.compare_and_set(created.replace(steps=9), expected_version=1) is None
            [written] = await store.write_many([(stored.replace(steps=2), 2)])
            assert isinstance(written, StreamRecord)
            assert await store.confirm_many([written, stored]) == [written, written]
            await store.put_snapshot(Snapshot("s1", "2026-01-01T00:00:00+00:00", written))
            assert not await store.delete_if_unchanged(stored)  # written since
            await store.delete(stream_id)
            with pytest.raises(StreamNotFound):
                await store.compare_and_set(stored, expected_version=2)
        gone = await store.create(record("d"))
        assert await store.delete_if_unchanged(gone)
        shas = {script.sha for script in store.scripts}
    finally:
        await store.aclose()
    assert {str(call[1]) for call in calls} == shas  # every script was exercised
    for call in calls:
        n_keys = int(str(call[2]))
        keys = [str(k).encode() for k in call[3 : 3 + n_keys]]
        assert n_keys >= 1 and len({key_slot(k) for k in keys}) == 1, call[:4]
    with redis_cluster.nodes[0].client() as node, pytest.raises(redis.ResponseError, match="same slot"):
        node.eval("return 1", 2, "test:{a}", "test:{b.2}")


async def test_redis_store_client_race_503_own_bug_raised() -> None:
    """redis-py's asyncio clients can raise AttributeError when a connection is torn down under
    a concurrent command (seen with the cluster client while a master restarts): 503 like any
    connection failure. The same error raised by our own code is a bug and stays one."""

    class TornDown:  # a connection whose writer a concurrent disconnect has just dropped
        _writer = None

    store = RedisStore("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StoreUnavailable, match="writelines"):
            async with store._translate():
                await AbstractConnection._send_packed_command(TornDown(), [b"PING"])  # type: ignore[arg-type]
        with pytest.raises(AttributeError):
            async with store._translate():
                TornDown._writer.writelines([b"PING"])  # type: ignore[attr-defined]
    finally:
        await store.aclose()
