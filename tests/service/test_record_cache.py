"""The Redis store's record cache (``service/store/cache.py``): hints that save a write its read,
never trusted without the compare-and-set, on a real redis-server with two stores on it (two
replicas)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.errors import Conflict, StreamNotFound
from service.metrics import Metrics
from service.store import RedisStore, StreamRecord, update_stream
from service.store.cache import RecordCache
from tests.service.test_store import record


def test_cache_keeps_the_latest_record_within_its_bytes() -> None:
    now = [0.0]
    cache = RecordCache(max_bytes=100, min_age_s=10, clock=lambda: now[0])
    cache.put(record("a"), 40)
    now[0] = 1
    cache.put(record("b"), 40)
    assert cache.get("a") == record("a") and cache.get("b") == record("b")
    cache.put(record("c"), 40)  # a and b are in use (younger than 10 s): c is not kept
    assert cache.get("c") is None and (len(cache), cache.nbytes) == (2, 80)
    now[0] = 10.5  # a is now older than 10 s, b not yet
    cache.put(record("c"), 40)
    assert cache.get("a") is None and cache.get("b") is not None and cache.get("c") is not None
    cache.put(record("b", steps=3), 30)  # replaces b, now the most recent
    assert cache.get("b") == record("b", steps=3) and cache.nbytes == 70
    cache.put(record("big"), 101)  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.nbytes == 70
    cache.drop("b")
    cache.drop("never")
    assert (len(cache), cache.nbytes) == (1, 40)
    assert (cache.hits, cache.misses) == (5, 3)


def test_a_fleet_larger_than_the_cache_keeps_hitting_on_part_of_it() -> None:
    """Streams written in a cycle over more than fit: plain LRU would evict each record just
    before its next use; here the first ones stay and hit on every round."""
    cache = RecordCache(max_bytes=10 * 40)
    for _ in range(3):
        for i in range(25):
            cache.get(f"s{i}")
            cache.put(record(f"s{i}"), 40)
    assert len(cache) == 10 and cache.hits == 2 * 10


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    one = RedisStore(redis_url, prefix="cache", cache_bytes=2**20)
    two = RedisStore(redis_url, prefix="cache", cache_bytes=2**20)
    try:
        yield one, two
    finally:
        await one.aclose()
        await two.aclose()


async def _increment(current: StreamRecord) -> tuple[StreamRecord, int]:
    return current.replace(steps=current.steps + 1), current.steps


async def test_a_write_starts_from_its_hint_without_reading(replicas: tuple[RedisStore, RedisStore]) -> None:
    one, _ = replicas
    created = await one.create(record("s"))
    assert one.hint("s") == created
    reads = 0
    get = one.get

    async def counted(stream_id: str) -> StreamRecord:
        nonlocal reads
        reads += 1
        return await get(stream_id)

    one.get = counted  # type: ignore[method-assign]
    for _ in range(3):
        await update_stream(one, "s", _increment, attempts=1)
    assert reads == 0
    assert one.hint("s") == await one.get("s") and (await get("s")).steps == 3


async def test_a_stale_hint_is_read_again_and_learned_from_once(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    """Replica two writes behind replica one's back: one's next write, computed from its stale
    hint, is refused and recomputed from a fresh read, without counting as a lost race."""
    one, two = replicas
    await one.create(record("s"))
    await update_stream(two, "s", _increment, attempts=1)  # one's hint is now one version behind
    seen: list[int] = []

    async def increment(current: StreamRecord) -> tuple[StreamRecord, int]:
        seen.append(current.steps)
        return await _increment(current)

    metrics = Metrics()
    stored, before = await update_stream(one, "s", increment, attempts=1, stats=metrics)
    assert seen == [0, 1] and before == 1  # the hint, then the fresh read
    assert stored is not None and stored.steps == 2 and (await two.get("s")).steps == 2
    assert metrics.store_conflicts._value.get() == 0


async def test_nothing_to_write_is_answered_from_a_fresh_read(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    one, two = replicas
    await one.create(record("s"))
    await update_stream(two, "s", _increment, attempts=1)

    async def nothing(current: StreamRecord) -> tuple[None, int]:
        return None, current.steps

    current, steps = await update_stream(one, "s", nothing, attempts=1)
    assert steps == 1 and current is not None and current.version == 2


async def test_a_deleted_stream_is_not_found_though_hinted(replicas: tuple[RedisStore, RedisStore]) -> None:
    one, two = replicas
    await one.create(record("s"))
    await two.delete("s")
    assert one.hint("s") is not None
    with pytest.raises(StreamNotFound):
        await update_stream(one, "s", _increment, attempts=3)
    assert one.hint("s") is None


async def test_a_recreated_stream_is_written_from_itself(replicas: tuple[RedisStore, RedisStore]) -> None:
    """A hint of the deleted stream never lands on its re-creation: the write is computed again
    from the stream that exists now."""
    one, two = replicas
    await one.create(record("s", steps=7))
    await two.delete("s")
    recreated = await two.create(record("s", mode="none"))
    stored, before = await update_stream(one, "s", _increment, attempts=1)
    assert before == 0 and stored is not None
    assert (stored.mode, stored.steps, stored.incarnation) == ("none", 1, recreated.incarnation)


async def test_bulk_reads_and_writes_keep_the_hints(replicas: tuple[RedisStore, RedisStore]) -> None:
    one, two = replicas
    written = await one.write_many([(record("a"), 0), (record("b"), 0)])
    assert [one.hint(s) for s in "ab"] == written
    fresh = await two.get_many(["a", "b", "missing"])
    assert [two.hint(s) for s in ("a", "b", "missing")] == fresh
    lost = await one.write_many([(written[0].replace(steps=1), 1), (written[1].replace(steps=1), 2)])
    assert lost[1] is None and one.hint("b") is None  # a lost race forgets the hint
    assert lost[0] == one.hint("a") and lost[0] is not None and lost[0].version == 2


async def test_bulk_confirms_its_hints_and_reads_only_the_stale(
    replicas: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirmation moves two small fields per current hint and the whole record only for a
    stream written by another replica since: never a record read for a hint still current."""
    one, two = replicas
    a, b = await one.write_many([(record("a"), 0), (record("b"), 0)])
    assert a is not None and b is not None and not isinstance(a, StreamNotFound)
    [b2] = await two.write_many([(b.replace(steps=5), b.version)])  # type: ignore[union-attr]
    reads: list[int] = []
    read = one._read
    monkeypatch.setattr(one, "_read", lambda fields: reads.append(1) or read(fields))
    assert await one.confirm_many([a, b]) == [a, b2]  # type: ignore[list-item]
    assert reads == [1] and one.hint("b") == b2  # only b read, and now held


async def test_a_refusal_is_given_from_a_fresh_read_only(replicas: tuple[RedisStore, RedisStore]) -> None:
    """Replica two resets the stream behind one's back: one's hint still shows observations,
    and a request refused for them would be refused wrongly."""
    one, two = replicas
    created = await one.create(record("s", steps=5))
    await two.compare_and_set(created.replace(steps=0), created.version)
    calls: list[int] = []

    async def only_if_empty(current: StreamRecord) -> tuple[StreamRecord, None]:
        calls.append(current.steps)
        if current.steps:
            raise Conflict("the stream has observations")
        return current.replace(mode="none"), None

    stored, _ = await update_stream(one, "s", only_if_empty, attempts=1)
    assert calls == [5, 0] and stored is not None and stored.mode == "none"
    await update_stream(two, "s", _increment, attempts=1)
    calls.clear()
    with pytest.raises(Conflict):  # refused again from a fresh read: raised
        await update_stream(two, "s", only_if_empty, attempts=1)
    assert calls == [1, 1]  # the hint, then the fresh read
