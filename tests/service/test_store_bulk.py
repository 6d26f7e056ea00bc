"""The stores' bulk read and write (one round trip each), through the StateStore protocol."""

from __future__ import annotations

import redis

from service.errors import StreamNotFound
from service.store import RedisStore, StateStore
from tests.conftest import with_cluster
from tests.service.test_store import record, store  # noqa: F401 - a fixture


@with_cluster
async def test_get_many_and_write_many(store: StateStore) -> None:  # noqa: F811
    a = await store.create(record("a"))
    b = await store.create(record("b"))
    assert await store.get_many(["a", "nope", "b"]) == [a, None, b]

    outcomes = await store.write_many(
        [
            (a.replace(steps=1), a.version),  # wins
            (b.replace(steps=1), b.version + 5),  # lost race: nothing written
            (record("new", steps=3), 0),  # created
            (record("a", steps=9), 0),  # creation of an existing id: a lost race
            (record("gone", incarnation="x"), 4),  # deleted meanwhile
        ]
    )
    assert isinstance(outcomes[0], type(a)) and outcomes[0].version == 2 and outcomes[0].steps == 1
    assert outcomes[1] is None and outcomes[3] is None
    assert isinstance(outcomes[4], StreamNotFound)
    new = outcomes[2]
    assert new is not None and not isinstance(new, StreamNotFound)
    assert (new.version, new.steps) == (1, 3) and new.incarnation
    assert await store.get_many(["a", "b", "new"]) == [outcomes[0], b, new]


@with_cluster
async def test_write_many_refuses_another_incarnation(store: StateStore) -> None:  # noqa: F811
    old = await store.create(record("x"))
    await store.delete("x")
    await store.create(record("x", mode="none"))
    [outcome] = await store.write_many([(old.replace(steps=7), old.version)])
    assert isinstance(outcome, StreamNotFound)
    assert (await store.get("x")).mode == "none"


@with_cluster
async def test_confirm_many_answers_each_stream_as_it_is_now(store: StateStore) -> None:  # noqa: F811
    """A record still current comes back as given; one written, deleted or re-created since
    comes back as stored (None: gone)."""
    a, b, c, d = [await store.create(record(s)) for s in "abcd"]
    [b2] = await store.write_many([(b.replace(steps=4), b.version)])
    await store.delete("c")
    await store.delete("d")
    d2 = await store.create(record("d", mode="none"))
    assert await store.confirm_many([a, b, c, d]) == [a, b2, None, d2]
    assert await store.confirm_many([]) == []


async def test_write_many_reloads_a_flushed_script_cache(redis_url: str) -> None:
    redis_store = RedisStore(redis_url, prefix="test")
    try:
        a = await redis_store.create(record("a"))
        redis.Redis.from_url(redis_url).script_flush()
        [outcome] = await redis_store.write_many([(a.replace(steps=2), a.version)])
        assert outcome is not None and not isinstance(outcome, StreamNotFound) and outcome.steps == 2
        redis.Redis.from_url(redis_url).script_flush()
        assert await redis_store.confirm_many([outcome, a]) == [outcome, outcome]
    finally:
        await redis_store.aclose()
