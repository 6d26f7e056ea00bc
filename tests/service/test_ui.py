"""The stream list and the page per stream: the endpoints they read (list, history), the static
assets they ship, and the pages in a real headless Chromium against ``memcast serve``."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import pytest

from memcast.harness import ServeProcess, clean_env
from memcast.webdriver import Browser, find_chromium
from service.settings import Settings
from tests.conftest import with_cluster
from tests.service.conftest import PRED_LEN, SEQ_LEN, Api, running, series

ROOT = Path(__file__).resolve().parents[2]


@with_cluster
async def test_list_streams_pages_through_every_stream(api: Api) -> None:
    ids = {f"s{i:02d}" for i in range(23)}
    for sid in sorted(ids):  # one at a time: what is tested is the listing
        await api.create(sid)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(30):
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        response = await api.client.get("/v1/streams", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["streams"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)  # each once, none missing


async def test_list_streams_of_an_empty_store(api: Api) -> None:
    assert (await api.client.get("/v1/streams")).json() == {"streams": [], "next_cursor": None}


async def test_list_streams_rejects_bad_limit(api: Api) -> None:
    response = await api.client.get("/v1/streams", params={"limit": 0})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "query.limit"


async def test_list_streams_ignores_other_keys(settings: Settings, redis_url: str) -> None:
    """In Redis the listing reads only this service's keys (its prefix)."""
    async with running(settings.model_copy(update={"redis_url": redis_url})) as api:
        await api.create("mine")
        store = api.app.state.store
        await store._redis.set("memcast:{not-a-hash}:x", "1")  # another key under the prefix
        await store._redis.set("other:{theirs}", "1")
        page = (await api.client.get("/v1/streams")).json()
    assert page == {"streams": ["mine"], "next_cursor": None}


async def test_get_history_holds_the_latest_values_and_past_forecasts(api: Api) -> None:
    rows = series(SEQ_LEN + PRED_LEN + 4)
    await api.create("s", rows[:SEQ_LEN])
    served = []
    for row in rows[SEQ_LEN:]:
        body = (await api.post("s", [row])).json()
        served.append(body["forecast"]["rows"])
    response = await api.client.get("/v1/streams/s/history")
    assert response.status_code == 200, response.text
    history = response.json()
    shown = rows[-(SEQ_LEN + PRED_LEN) :]  # the state keeps seq_len + pred_len values
    assert [r["timestamp"] for r in history["rows"]] == [r["timestamp"] for r in shown]
    for got, want in zip(history["rows"], shown, strict=True):
        assert list(got["values"].values()) == pytest.approx(want["values"], rel=1e-6)
    # the newest row: forecast one step ahead by the previous request
    newest = history["rows"][-1]
    assert newest["forecast_step"] == 1
    assert newest["forecast"] == pytest.approx(served[-2][0]["values"])
    assert history["columns"] == history["targets"] == ["load_a", "OT"]


async def test_get_history_of_a_new_stream_is_empty(api: Api) -> None:
    await api.create("s")
    body = (await api.client.get("/v1/streams/s/history")).json()
    assert body["rows"] == [] and body["steps"] == 0


async def test_pages_and_assets_are_served_without_a_key(settings: Settings) -> None:
    async with running(settings.model_copy(update={"api_keys": "secret"})) as api:
        for path, kind in [
            ("/ui", "text/html"),
            ("/ui/streams/s-1", "text/html"),
            ("/ui/static/app.js", "text/javascript"),
            ("/ui/static/style.css", "text/css"),
        ]:
            response = await api.client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(kind)
            assert "default-src 'self'" in response.headers["content-security-policy"]
        assert (await api.client.get("/ui/config.json")).json() == {"api_key_required": True}
        assert (await api.client.get("/v1/streams")).status_code == 401  # the data still needs it
        missing = await api.client.get("/ui/static/app.py")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "name"
        assert (await api.client.get("/ui/static/..%2F..%2Fapp.py")).status_code == 404


def test_pages_load_nothing_from_elsewhere() -> None:
    """No CDN: every URL in the shipped assets is the service's own (or the SVG namespace)."""
    ui = resources.files("service") / "ui"
    for name in ("index.html", "stream.html", "app.js", "style.css"):
        text = (ui / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not {u for u in urls if not u.startswith("//")}, (name, urls)
        assert 'src="http' not in text and 'href="http' not in text


def test_the_check_finds_a_cdn_url() -> None:
    """Guard of the guard above."""
    text = '<script src="https://cdn.example.com/lib.js"></script>'
    assert re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'`)]*", text) == ["https://cdn.example.com/lib.js"]


# -- in a real browser ---------------------------------------------------------------------------

KEY = "page-test-key"


@pytest.fixture
def served(checkpoint_root: Path, tmp_path: Path) -> Iterator[str]:
    args = ["--checkpoints", str(checkpoint_root), "--default-model", "small"]
    env = clean_env(MEMCAST_API_KEYS=KEY)
    with ServeProcess(args, env=env, log=tmp_path / "serve.log") as process:
        yield process.url


def _points(browser: Browser, kind: str) -> int:
    return int(browser.run(f"return document.querySelectorAll('#chart circle.{kind}').length"))


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="chromium and chromedriver are not installed")
def test_stream_page_in_chromium_shows_the_stream_and_new_observations(served: str, tmp_path: Path) -> None:
    rows = series(SEQ_LEN + 2 * PRED_LEN + 6)
    with httpx.Client(base_url=served, headers={"X-API-Key": KEY}, timeout=30) as client:
        assert client.post("/v1/streams", json={"id": "site-7", "history": rows[:SEQ_LEN]}).status_code == 201
        for row in rows[SEQ_LEN:-1]:
            assert client.post("/v1/streams/site-7/observations", json=row).status_code == 200
        history = client.get("/v1/streams/site-7/history").json()["rows"]

        with Browser(tmp_path / "chromedriver.log", height=1150) as browser:
            browser.get(f"{served}/ui")
            browser.wait(
                lambda: browser.run("return !document.getElementById('auth').hidden"), what="key form"
            )
            browser.send_keys("#key", KEY)
            browser.click("#auth button")
            browser.wait(lambda: browser.run("return document.querySelectorAll('#streams a').length") == 1)
            assert browser.run("return document.querySelector('#streams a').textContent") == "site-7"

            browser.get(f"{served}/ui/streams/site-7")  # same tab: the key is still in sessionStorage
            browser.wait(lambda: _points(browser, "history") == len(history), what="the history points")
            assert _points(browser, "forecast") == PRED_LEN
            assert _points(browser, "past") > 0
            tips = browser.run(
                "return [...document.querySelectorAll('#chart circle.history title')].map(t => t.textContent)"
            )
            assert [t.split(":")[0] for t in tips] == [str(r["timestamp"]) for r in history]
            skill_rows = browser.run("return document.querySelectorAll('#accuracy tbody tr').length")
            assert skill_rows == 1 + PRED_LEN

            new = rows[-1]
            assert client.post("/v1/streams/site-7/observations", json=new).status_code == 200
            browser.wait(
                lambda: (
                    browser.run("return document.getElementById('chart').dataset.steps") == str(len(rows))
                ),
                what="the new observation",
            )
            last_tip = browser.run(
                "return [...document.querySelectorAll('#chart circle.history title')].pop().textContent"
            )
            assert last_tip.startswith(f"{new['timestamp']}:")
            assert KEY not in browser.run("return location.href")
            errors = [e for e in browser.console() if e["level"] == "SEVERE"]
            assert not errors, errors
            shot = tmp_path / "stream-page.png"
            browser.screenshot(shot)
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, ROOT / "docs" / "img" / "stream-page.png")
