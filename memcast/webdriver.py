"""Headless Chromium for the page tests: ``chromedriver`` on a free loopback port, one browser
session, driven through the W3C WebDriver HTTP protocol with httpx (what selenium speaks, without
the dependency).

Debian: ``apt-get install chromium chromium-driver``. The browser runs with a fresh profile
and with every background network feature off, so it only ever talks to the page under test.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from memcast.harness import HarnessError, _tail, free_port

T = TypeVar("T")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or ``None`` when either is missing."""
    browser = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class Browser:
    """One headless Chromium session; a context manager that always ends the session and the
    driver."""

    def __init__(self, log: Path, *, width: int = 1200, height: int = 900) -> None:
        found = find_chromium()
        if found is None:
            raise HarnessError("chromium and chromedriver are not on PATH")
        self.binary, self.driver = found
        self.log, self.size = log, (width, height)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.session: str | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="memcast-chromium-")
        self._http = httpx.Client(timeout=60)

    def start(self, timeout: float = 30.0) -> Browser:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.driver, f"--port={self.port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self._until(lambda: self._ready(), timeout, "chromedriver did not become ready")
        args = [
            *CHROMIUM_ARGS,
            f"--user-data-dir={self._profile.name}",
            "--window-size={},{}".format(*self.size),
        ]
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": self.binary, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = value["sessionId"]
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise HarnessError(f"chromedriver exited with {self.process.returncode}:\n{_tail(self.log)}")
        try:
            return bool(self._http.get(f"{self.base}/status").json()["value"]["ready"])
        except httpx.TransportError:
            return False

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, f"{self.base}{path}", json=body)
        value = response.json().get("value")
        if response.status_code >= 400:
            raise HarnessError(f"WebDriver {method} {path}: {value}")
        return value

    def _s(self, path: str) -> str:
        assert self.session is not None, "start() first"
        return f"/session/{self.session}{path}"

    # -- what tests use ----------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds ``args``) and return its value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        return str(self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT])

    def send_keys(self, css: str, text: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/value"), {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/click"), {})

    def console(self) -> list[dict[str, Any]]:
        """The browser's console entries since the last call (``level``, ``message``)."""
        return list(self._call("POST", self._s("/se/log"), {"type": "browser"}))

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", self._s("/screenshot"))))

    def wait(self, check: Callable[[], T], timeout: float = 20.0, what: str = "the page") -> T:
        """Poll ``check()`` until it returns something truthy."""
        return self._until(check, timeout, f"timed out waiting for {what}")

    @staticmethod
    def _until(check: Callable[[], T], timeout: float, message: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise HarnessError(message)
            time.sleep(0.1)

    def quit(self) -> None:
        try:
            if self.session is not None:
                self._call("DELETE", self._s(""))
        except (httpx.HTTPError, HarnessError):
            pass  # the driver is stopped below either way
        finally:
            self.session = None
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
            self._http.close()
            self._profile.cleanup()

    def __enter__(self) -> Browser:
        try:
            return self.start()
        except BaseException:
            self.quit()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.quit()
