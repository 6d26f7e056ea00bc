"""State lifecycle: named snapshots and revert, export and import, on either store. The
equivalences: snapshot -> more observations -> revert is the snapshot's state byte for byte and
its forecast; export -> import forecasts as the original does, now and after more observations."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service import lifecycle
from service.expiry import sweep
from service.settings import Settings
from tests.conftest import with_cluster
from tests.service.conftest import PRED_LEN, SEQ_LEN, Api, make_checkpoint, running, series


async def _forecast(api: Api, stream_id: str) -> dict:
    response = await api.client.get(f"/v1/streams/{stream_id}/forecast")
    assert response.status_code == 200, response.text
    return response.json()["forecast"]


async def test_revert_to_snapshot_restores_state_bytes_and_forecast(api: Api) -> None:
    rows = series(SEQ_LEN + 8)
    await api.create("s", rows[:SEQ_LEN])
    await api.post("s", rows[SEQ_LEN : SEQ_LEN + 2])
    before, forecast = await api.record("s"), await _forecast(api, "s")
    response = await api.client.post("/v1/streams/s/snapshots", json={"name": "warm"})
    assert response.status_code == 201, response.text
    assert response.json()["steps"] == SEQ_LEN + 2 and response.json()["name"] == "warm"

    await api.post("s", rows[SEQ_LEN + 2 :])
    changed = await api.record("s")
    assert changed.state != before.state and await _forecast(api, "s") != forecast

    response = await api.client.post("/v1/streams/s/snapshots/warm/revert")
    assert response.status_code == 200, response.text
    after = await api.record("s")
    assert after.state == before.state  # byte-identical
    assert (after.steps, after.last_timestamp, after.recent, after.accuracy) == (
        before.steps,
        before.last_timestamp,
        before.recent,
        before.accuracy,
    )
    assert after.version == changed.version + 1  # one more compare-and-set write
    assert await _forecast(api, "s") == forecast
    # the stream goes on from there: the rows after the snapshot are new again
    assert (await api.post("s", rows[SEQ_LEN + 2 :])).json()["applied"] == 6


@with_cluster
async def test_snapshots_list_get_delete(api: Api) -> None:
    await api.create("s", series(3))
    for name in ("b", "a"):
        assert (await api.client.post("/v1/streams/s/snapshots", json={"name": name})).status_code == 201
    taken = (await api.client.get("/v1/streams/s/snapshots")).json()["snapshots"]
    assert [t["name"] for t in taken] == ["a", "b"] and taken[0]["steps"] == 3
    assert (await api.client.get("/v1/streams/s/snapshots/a")).json()["model"] == "small"
    again = await api.client.post("/v1/streams/s/snapshots", json={"name": "a"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "snapshot_exists"
    assert (await api.client.delete("/v1/streams/s/snapshots/a")).status_code == 204
    missing = await api.client.get("/v1/streams/s/snapshots/a")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "snapshot_not_found"
    assert (await api.client.post("/v1/streams/s/snapshots/a/revert")).status_code == 404
    bad = await api.client.post("/v1/streams/s/snapshots", json={"name": "../x"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "name"


@with_cluster
async def test_delete_stream_deletes_its_snapshots(api: Api) -> None:
    await api.create("s", series(2))
    await api.client.post("/v1/streams/s/snapshots", json={"name": "one"})
    assert (await api.client.delete("/v1/streams/s")).status_code == 204
    assert (await api.client.get("/v1/streams/s/snapshots")).status_code == 404
    await api.create("s")
    assert (await api.client.get("/v1/streams/s/snapshots")).json() == {"snapshots": []}
    assert (await api.client.get("/v1/streams")).json()["streams"] == ["s"]  # snapshots are not streams


async def test_export_then_import_forecasts_identically(api: Api) -> None:
    rows = series(SEQ_LEN + 6)
    await api.create("src", rows[:SEQ_LEN])
    for row in rows[SEQ_LEN:-2]:
        await api.post("src", [row])
    exported = await api.client.get("/v1/streams/src/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"

    response = await api.client.post("/v1/streams/copy/import", content=exported.content)
    assert response.status_code == 200, response.text
    assert response.json()["steps"] == SEQ_LEN + 4
    assert await _forecast(api, "copy") == await _forecast(api, "src")
    src, copy = await api.record("src"), await api.record("copy")
    assert (copy.recent, copy.accuracy, copy.last_timestamp) == (src.recent, src.accuracy, src.last_timestamp)
    for sid in ("src", "copy"):  # and they learn alike from here on
        assert (await api.post(sid, rows[-2:])).status_code == 200
    assert await _forecast(api, "copy") == await _forecast(api, "src")
    # duplicates are still recognised in the copy
    assert (await api.post("copy", rows[-2:])).json()["duplicates"] == 2


async def test_import_into_a_stream_with_observations_is_409_until_reset(api: Api) -> None:
    await api.create("src", series(SEQ_LEN))
    blob = (await api.client.get("/v1/streams/src/export")).content
    await api.create("busy", series(2))
    refused = await api.client.post("/v1/streams/busy/import", content=blob)
    assert refused.status_code == 409 and refused.json()["error"]["field"] == "stream_id"
    assert (await api.record("busy")).steps == 2
    assert (await api.client.post("/v1/streams/busy/reset")).status_code == 200
    assert (await api.client.post("/v1/streams/busy/import", content=blob)).json()["steps"] == SEQ_LEN


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"not a state at all",
        lambda b: b[:8] + b"[" + b[9:],  # broken header JSON
        lambda b: b.replace(b"memcast.record", b"memcast.recorx"),  # no record
        lambda b: b[: len(b) - 16],  # truncated tensor data
    ],
    ids=["garbage", "header", "no-record", "truncated"],
)
async def test_import_of_a_malformed_blob_is_422_and_writes_nothing(api: Api, damage) -> None:  # noqa: ANN001
    await api.create("src", series(SEQ_LEN))
    blob = (await api.client.get("/v1/streams/src/export")).content
    response = await api.client.post("/v1/streams/new/import", content=damage(blob))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body"
    assert (await api.client.get("/v1/streams/new")).status_code == 404


def _with_field(blob: bytes, name: str, value: Any) -> bytes:
    """The export with one of its record's fields replaced (``value`` JSON-encoded as stored)."""
    header, data = lifecycle._split(blob)
    fields = json.loads(header["__metadata__"][lifecycle.ARCHIVE_KEY])
    fields[name] = json.dumps(value)
    header["__metadata__"][lifecycle.ARCHIVE_KEY] = json.dumps(fields)
    return lifecycle._join(header, data)


def _accuracy(blob: bytes) -> dict[str, Any]:
    header, _ = lifecycle._split(blob)
    return json.loads(json.loads(header["__metadata__"][lifecycle.ARCHIVE_KEY])["accuracy"])


@pytest.mark.parametrize(
    "field, damage",
    [
        ("accuracy", lambda a: {**a, "totals": [[1.0, 2.0]]}),
        ("accuracy", lambda a: {**a, "ring": {**a["ring"], "f8": "AAAA"}}),
        ("accuracy", lambda a: {**a, "pending": {**a["pending"], "shape": [1, 1]}}),
        (
            "accuracy",
            lambda a: {**a, "pending": {**a["pending"], "origin": [-50] * len(a["pending"]["origin"])}},
        ),
        ("accuracy", lambda a: {"pending": 3}),
        ("intervals", lambda a: {"levels": [0.9], "ratio": [[[1.0]]], "scale": [[1.0]], "count": [[1.0]]}),
        ("intervals", lambda a: {"levels": [1.5], "ratio": None, "scale": None, "count": None}),
        ("forecast", lambda a: [[1.0]]),
        ("recent", lambda a: [[1]]),
    ],
    ids=[
        "totals",
        "ring",
        "pending-shape",
        "pending-origin",
        "not-arrays",
        "ratio",
        "levels",
        "forecast",
        "recent",
    ],
)
async def test_import_of_a_record_that_does_not_fit_is_422_and_writes_nothing(
    api: Api,
    field: str,
    damage,  # noqa: ANN001
) -> None:
    """An export whose record was edited (by hand, by another program) is refused at import,
    not with a 500 on the stream's next request."""
    rows = series(SEQ_LEN + PRED_LEN + 2)
    await api.create("src", rows[:SEQ_LEN])
    await api.post("src", rows[SEQ_LEN:])
    blob = (await api.client.get("/v1/streams/src/export")).content
    assert (await api.client.post("/v1/streams/copy/import", content=blob)).status_code == 200  # as exported
    damaged = _with_field(blob, field, damage(_accuracy(blob)))
    response = await api.client.post("/v1/streams/new/import", content=damaged)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body"
    assert (await api.client.get("/v1/streams/new")).status_code == 404


async def test_import_of_another_models_state_is_409_and_writes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    make_checkpoint(tmp_path / "other" / "small", seed=5)  # same name, other weights
    async with running(settings) as api:
        await api.create("src", series(SEQ_LEN))
        blob = (await api.client.get("/v1/streams/src/export")).content
    async with running(settings.model_copy(update={"checkpoint_dir": tmp_path / "other"})) as other:
        response = await other.client.post("/v1/streams/new/import", content=blob)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["type"] == "state_incompatible"
        assert (await other.client.get("/v1/streams/new")).status_code == 404


async def test_import_over_the_body_limit_is_413(settings: Settings) -> None:
    async with running(settings.model_copy(update={"max_body_bytes": 1024})) as api:
        await api.create("src", series(SEQ_LEN))
        blob = (await api.client.get("/v1/streams/src/export")).content
        assert len(blob) > 1024
        response = await api.client.post("/v1/streams/new/import", content=blob)
        assert response.status_code == 413
        assert (await api.client.get("/v1/streams/new")).status_code == 404


# -- idle expiry -----------------------------------------------------------------------------------


@with_cluster
async def test_sweep_expires_only_idle_streams_with_their_snapshots(api: Api) -> None:
    store, metrics = api.app.state.store, api.app.state.metrics
    await api.create("old", series(2))
    await api.create("fresh", series(2))
    await api.client.post("/v1/streams/old/snapshots", json={"name": "keep"})
    old = await store.get("old")
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert await store.compare_and_set(old.replace(updated_at=hour_ago), old.version) is not None

    assert await sweep(store, 600, metrics) == 1
    assert (await api.client.get("/v1/streams/old")).status_code == 404
    assert (await api.client.get("/v1/streams/fresh")).status_code == 200
    await api.create("old")  # the id is free again, without the old snapshots
    assert (await api.client.get("/v1/streams/old/snapshots")).json() == {"snapshots": []}
    text = (await api.client.get("/metrics")).text
    assert "memcast_streams_expired_total 1.0" in text


async def test_expiry_never_deletes_a_stream_written_after_it_was_read(api: Api) -> None:
    store = api.app.state.store
    await api.create("s", series(2))
    read = await store.get("s")
    await api.post("s", series(1, start=2))  # a write between the sweep's read and its delete
    assert not await store.delete_if_unchanged(read)
    assert (await store.get("s")).steps == 3
    assert await store.delete_if_unchanged(await store.get("s"))


async def test_expiry_never_deletes_a_stream_re_created_after_it_was_read(api: Api) -> None:
    """Same version, another incarnation (deleted and created again): kept (the ABA case)."""
    store = api.app.state.store
    await api.create("s", series(2))
    read = await store.get("s")
    await api.client.delete("/v1/streams/s")
    await api.create("s", series(2))
    assert (await store.get("s")).version == read.version
    assert not await store.delete_if_unchanged(read)
    assert (await store.get("s")).steps == 2


async def test_idle_streams_expire_in_a_running_app(settings: Settings) -> None:
    async with running(settings.model_copy(update={"stream_ttl_s": 0.4})) as api:
        await api.create("s", series(2))
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await api.client.get("/v1/streams/s")).status_code == 404:
                break
        assert (await api.client.get("/v1/streams/s")).status_code == 404
