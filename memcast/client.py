"""A small Python client of the memcast HTTP API (httpx), sync and async::

    from memcast.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as mc:
        mc.create("meter-1", history=[(0, {"load": 1.0})])
        mc.create_many([{"id": f"meter-{k}", "history": [(0, [1.0])]} for k in range(2, 500)])
        mc.observe("meter-1", 1, {"load": 1.2})
        result = mc.bulk([("meter-1", 2, [1.3]), ("meter-2", 0, [0.9])], create={"mode": "memory_only"})
        mc.forecast("meter-1")

``AsyncClient`` has the same methods, as coroutines. Answers are the API's JSON as dicts; an
error answer raises :class:`MemcastError` with its status, type, message and field. A bulk
request answers 200 even when some items failed: see ``result["observations"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import httpx
import orjson

Values = Sequence[float] | Mapping[str, float]
Timestamp = int | str | datetime
# an observation: {"timestamp", "values"} or (timestamp, values)
ObservationIn = Mapping[str, Any] | tuple[Timestamp, Values]
# a bulk item: {"stream_id", "timestamp", "values"} or (stream_id, timestamp, values)
BulkItemIn = Mapping[str, Any] | tuple[str, Timestamp, Values]

__all__ = ["AsyncClient", "Client", "MemcastError"]


class MemcastError(Exception):
    """An error answer: ``status`` (HTTP), ``type``, ``message``, ``field`` and the whole ``body``."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status, self.body = status, body
        self.type: str = error.get("type", "http_error")
        self.message: str = error.get("message", str(body))
        self.field: str | None = error.get("field")
        super().__init__(f"{status} {self.type}: {self.message}" + (f" ({self.field})" if self.field else ""))


def _ts(timestamp: Timestamp) -> int | str:
    return timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp


def _values(values: Values) -> list[float] | dict[str, float]:
    return dict(values) if isinstance(values, Mapping) else list(values)


def _observation(item: ObservationIn) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {**item, "timestamp": _ts(item["timestamp"])}
    timestamp, values = item
    return {"timestamp": _ts(timestamp), "values": _values(values)}


def _bulk_item(item: BulkItemIn) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {**item, "timestamp": _ts(item["timestamp"])}
    stream_id, timestamp, values = item
    return {"stream_id": stream_id, "timestamp": _ts(timestamp), "values": _values(values)}


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


class _Requests:
    """Method, path and body of each call, shared by both clients."""

    @staticmethod
    def create(
        stream_id: str | None,
        model: str | None,
        mode: str | None,
        freq: str | None,
        history: Iterable[ObservationIn] | None,
    ) -> dict[str, Any]:
        body = _drop_none({"id": stream_id, "model": model, "mode": mode, "freq": freq})
        if history is not None:
            body["history"] = [_observation(o) for o in history]
        return body

    @staticmethod
    def observe(observations: Iterable[ObservationIn], mode: str | None) -> dict[str, Any]:
        return _drop_none({"observations": [_observation(o) for o in observations], "mode": mode})

    @staticmethod
    def bulk(
        items: Iterable[BulkItemIn],
        forecasts: Literal["last", "none"],
        mode: str | None,
        create: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        body = {"observations": [_bulk_item(i) for i in items], "forecasts": forecasts, "mode": mode}
        return _drop_none({**body, "create": dict(create) if create is not None else None})

    @staticmethod
    def create_many(streams: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        out = []
        for spec in streams:
            body = dict(spec)
            if body.get("history") is not None:
                body["history"] = [_observation(o) for o in body["history"]]
            out.append(body)
        return {"streams": out}


def _answer(response: httpx.Response) -> Any:
    if response.status_code == 204:
        return None
    try:  # orjson: a bulk response carries a forecast per stream, and json.loads was most of its cost
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = response.text
    if response.status_code >= 400:
        raise MemcastError(response.status_code, body)
    return body


def _client_args(base_url: str, api_key: str | None, timeout: float, **kwargs: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url, "headers": headers, "timeout": timeout, **kwargs}


class Client:
    """Blocking client; pass ``transport=`` (httpx) to talk to an app in-process."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, **httpx_args: Any
    ):
        self._http = httpx.Client(**_client_args(base_url, api_key, timeout, **httpx_args))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return _answer(self._http.request(method, path, json=body))

    def create(
        self,
        stream_id: str | None = None,
        *,
        model: str | None = None,
        mode: str | None = None,
        freq: str | None = None,
        history: Iterable[ObservationIn] | None = None,
    ) -> dict[str, Any]:
        return self._call("POST", "/v1/streams", _Requests.create(stream_id, model, mode, freq, history))

    def create_many(self, streams: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Many streams in one request, each ``{"id", "model", "mode", "freq", "history"}`` as
        :meth:`create` takes them (history rows as dicts or ``(timestamp, values)``); one result
        per stream in ``result["streams"]`` (201 or its own error), in order."""
        return self._call("POST", "/v1/streams:batchCreate", _Requests.create_many(streams))

    def observe(
        self, stream_id: str, timestamp: Timestamp, values: Values, *, mode: str | None = None
    ) -> dict[str, Any]:
        return self.observe_many(stream_id, [(timestamp, values)], mode=mode)

    def observe_many(
        self, stream_id: str, observations: Iterable[ObservationIn], *, mode: str | None = None
    ) -> dict[str, Any]:
        """One stream's observations, ``(timestamp, values)`` or dicts, in time order."""
        body = _Requests.observe(observations, mode)
        return self._call("POST", f"/v1/streams/{stream_id}/observations", body)

    def bulk(
        self,
        items: Iterable[BulkItemIn],
        *,
        forecasts: Literal["last", "none"] = "last",
        mode: str | None = None,
        create: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Observations of many streams in one request; ``create={"model", "mode", "freq"}``
        creates the streams that do not exist yet."""
        return self._call("POST", "/v1/observations", _Requests.bulk(items, forecasts, mode, create))

    def forecast(self, stream_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/streams/{stream_id}/forecast")

    def get(self, stream_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/streams/{stream_id}")

    def delete(self, stream_id: str) -> None:
        self._call("DELETE", f"/v1/streams/{stream_id}")

    def reset(self, stream_id: str, *, model: str | None = None, mode: str | None = None) -> dict[str, Any]:
        return self._call(
            "POST", f"/v1/streams/{stream_id}/reset", _drop_none({"model": model, "mode": mode})
        )


class AsyncClient:
    """The same calls as :class:`Client`, as coroutines."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, **httpx_args: Any
    ):
        self._http = httpx.AsyncClient(**_client_args(base_url, api_key, timeout, **httpx_args))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        return _answer(await self._http.request(method, path, json=body))

    async def create(
        self,
        stream_id: str | None = None,
        *,
        model: str | None = None,
        mode: str | None = None,
        freq: str | None = None,
        history: Iterable[ObservationIn] | None = None,
    ) -> dict[str, Any]:
        return await self._call(
            "POST", "/v1/streams", _Requests.create(stream_id, model, mode, freq, history)
        )

    async def create_many(self, streams: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        return await self._call("POST", "/v1/streams:batchCreate", _Requests.create_many(streams))

    async def observe(
        self, stream_id: str, timestamp: Timestamp, values: Values, *, mode: str | None = None
    ) -> dict[str, Any]:
        return await self.observe_many(stream_id, [(timestamp, values)], mode=mode)

    async def observe_many(
        self, stream_id: str, observations: Iterable[ObservationIn], *, mode: str | None = None
    ) -> dict[str, Any]:
        body = _Requests.observe(observations, mode)
        return await self._call("POST", f"/v1/streams/{stream_id}/observations", body)

    async def bulk(
        self,
        items: Iterable[BulkItemIn],
        *,
        forecasts: Literal["last", "none"] = "last",
        mode: str | None = None,
        create: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return await self._call("POST", "/v1/observations", _Requests.bulk(items, forecasts, mode, create))

    async def forecast(self, stream_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/streams/{stream_id}/forecast")

    async def get(self, stream_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/streams/{stream_id}")

    async def delete(self, stream_id: str) -> None:
        await self._call("DELETE", f"/v1/streams/{stream_id}")

    async def reset(
        self, stream_id: str, *, model: str | None = None, mode: str | None = None
    ) -> dict[str, Any]:
        return await self._call(
            "POST", f"/v1/streams/{stream_id}/reset", _drop_none({"model": model, "mode": mode})
        )
