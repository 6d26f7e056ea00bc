"""memcast.client against the app in-process: what users call instead of hand-rolled JSON."""

from __future__ import annotations

import json

import httpx
import pytest

from memcast.client import AsyncClient, Client, MemcastError
from service.settings import Settings
from tests.service.conftest import SEQ_LEN, running, series


async def test_async_client_create_observe_bulk_forecast(settings: Settings) -> None:
    async with running(settings) as api:
        transport = httpx.ASGITransport(app=api.app)
        async with AsyncClient("http://memcast", transport=transport) as mc:
            rows = series(SEQ_LEN + 2)
            created = await mc.create("a", history=[(r["timestamp"], r["values"]) for r in rows[:SEQ_LEN]])
            assert created["steps"] == SEQ_LEN
            one = await mc.observe("a", rows[SEQ_LEN]["timestamp"], rows[SEQ_LEN]["values"])
            assert one["applied"] == 1
            result = await mc.bulk(
                [("a", rows[-1]["timestamp"], rows[-1]["values"]), ("b", 0, {"load_a": 1.0, "OT": 2.0})],
                create={"mode": "memory_only"},
            )
            assert [o["status"] for o in result["observations"]] == ["applied", "applied"]
            assert (await mc.forecast("a"))["steps"] == SEQ_LEN + 2
            assert (await mc.get("b"))["steps"] == 1
            many = await mc.create_many([{"id": "c", "history": [(0, [1.0, 2.0])]}, {"id": "a"}])
            assert [s["code"] for s in many["streams"]] == [201, 409]
            assert (await mc.get("c"))["steps"] == 1
            with pytest.raises(MemcastError) as error:
                await mc.observe("a", 0, [1.0, 2.0])
            assert (error.value.status, error.value.type) == (409, "out_of_order")
            await mc.delete("b")
            with pytest.raises(MemcastError) as error:
                await mc.forecast("b")
            assert error.value.status == 404 and error.value.field == "stream_id"


def test_sync_client_sends_what_the_async_one_does() -> None:
    sent: list[tuple[str, str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.method, request.url.path, json.loads(request.content or b"null")))
        return httpx.Response(200, json={"ok": True})

    with Client("http://memcast", api_key="k", transport=httpx.MockTransport(handler)) as mc:
        mc.create("a", mode="full_model", history=[(0, [1.0, 2.0])])
        mc.observe("a", 1, {"load_a": 1.0, "OT": 2.0})
        mc.observe_many("a", [{"timestamp": 2, "values": [1, 2]}, (3, [1, 2])], mode="none")
        mc.bulk([("a", 4, [1, 2]), {"stream_id": "b", "timestamp": 0, "values": [1, 2]}], forecasts="none")
        mc.create_many([{"id": "c", "mode": "none", "history": [(0, [1.0, 2.0])]}])
    assert sent == [
        (
            "POST",
            "/v1/streams",
            {"id": "a", "mode": "full_model", "history": [{"timestamp": 0, "values": [1.0, 2.0]}]},
        ),
        (
            "POST",
            "/v1/streams/a/observations",
            {"observations": [{"timestamp": 1, "values": {"load_a": 1.0, "OT": 2.0}}]},
        ),
        (
            "POST",
            "/v1/streams/a/observations",
            {
                "observations": [{"timestamp": 2, "values": [1, 2]}, {"timestamp": 3, "values": [1, 2]}],
                "mode": "none",
            },
        ),
        (
            "POST",
            "/v1/observations",
            {
                "observations": [
                    {"stream_id": "a", "timestamp": 4, "values": [1, 2]},
                    {"stream_id": "b", "timestamp": 0, "values": [1, 2]},
                ],
                "forecasts": "none",
            },
        ),
        (
            "POST",
            "/v1/streams:batchCreate",
            {"streams": [{"id": "c", "mode": "none", "history": [{"timestamp": 0, "values": [1.0, 2.0]}]}]},
        ),
    ]
