"""/ui: the stream list and a page per stream, static HTML, JavaScript and CSS shipped inside
the package (``service/ui``; no CDN). The pages themselves need no key: their script reads
``/ui/config.json``, asks for a key when the API needs one and sends it as a header."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from service import schemas
from service.api.deps import SettingsDep
from service.errors import NotFound

router = APIRouter(prefix="/ui", include_in_schema=False)

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
_STATIC = ("app.js", "style.css")
# the pages load nothing but their own script and style sheet
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    data = (resources.files("service") / "ui" / name).read_bytes()
    return Response(data, media_type=_TYPES[name[name.rindex(".") :]], headers=_HEADERS)


@router.get("")
@router.get("/")
async def streams_page() -> Response:
    return _file("index.html")


@router.get("/streams/{stream_id}")
async def stream_page(stream_id: schemas.StreamId) -> Response:
    return _file("stream.html")


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    if name not in _STATIC:
        raise NotFound(f"no file {name!r} in the pages' assets", field="name")
    return _file(name)


@router.get("/config.json")
async def page_config(settings: SettingsDep) -> dict[str, bool]:
    return {"api_key_required": bool(settings.api_key_list)}
