"""HTTP clients of the load generator's timed loop: one connection, one request at a time."""

from __future__ import annotations

import asyncio


class RawPoster:
    """A minimal HTTP/1.1 keep-alive client for the posting loop: one connection, one request at
    a time, ``Content-Length`` bodies only (what the service sends).

    Measured on the 2-core benchmark machine against ``/healthz``: 0.1-0.2 ms of client CPU per
    request, against 2-5 ms for an ``httpx.AsyncClient`` (more with more connections). The
    generator shares the machine with the server, so with httpx it would take most of the CPU
    the server needs and measure itself; ``--http-client httpx`` keeps that option.
    """

    def __init__(self, url: str, timeout: float) -> None:
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port, self.timeout = int(port), timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                if self.writer is None:
                    await self._connect()
                assert self.reader is not None and self.writer is not None
                head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                if body:
                    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                self.writer.write(head.encode() + b"\r\n" + body)
                await self.writer.drain()
                header = await self.reader.readuntil(b"\r\n\r\n")
                status, length, close = int(header[9:12]), 0, False
                for line in header.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding":
                        raise ConnectionError("chunked responses are not supported by this client")
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                data = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            await self.aclose()
            raise
        if close:
            await self.aclose()
        return status, data

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


class HttpxPoster:
    """The same interface over one ``httpx.AsyncClient`` with one connection."""

    def __init__(self, url: str, timeout: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        import httpx

        headers = {"content-type": "application/json"} if body else None
        try:
            response = await self.client.request(method, path, content=body or None, headers=headers)
        except httpx.HTTPError as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self.client.aclose()
