"""A small TCP proxy on loopback that the tests put between the service and Redis to inject
faults: delay every chunk, black-hole the traffic (bytes are swallowed, connections stay
open), cut every connection, or hold the first client chunk that contains a byte pattern
until the test releases it (to stop a writer deterministically between its read and its
write).

Threads and blocking sockets, so it keeps working while the test's event loop is busy.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

from memcast.harness import free_port


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.delay_s = 0.0  # added before forwarding each chunk, both directions
        self.blackhole = False  # swallow bytes in both directions
        self._hold_pattern: bytes | None = None
        self.held = threading.Event()  # set when a chunk matching the pattern is being held
        self._release = threading.Event()
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------------
    def hold(self, pattern: bytes) -> None:
        """Hold the next client->server chunk containing ``pattern`` until :meth:`release`."""
        self.held.clear()
        self._release.clear()
        self._hold_pattern = pattern

    def release(self) -> None:
        self._hold_pattern = None
        self._release.set()

    def cut(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closing.set()
        self._release.set()
        self.cut()
        self._listener.close()
        self._thread.join(timeout=5)

    # -- plumbing -------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, server}
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while not self._closing.is_set():
                chunk = src.recv(65536)
                if not chunk:
                    break
                pattern = self._hold_pattern
                if to_server and pattern is not None and pattern in chunk:
                    self.held.set()
                    self._release.wait()
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self.blackhole:
                    continue
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
