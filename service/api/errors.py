"""Exception handlers: every error leaves as ``{"error": {"type", "message", "field"?, "details"?}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError, status_for
from service.schemas import ErrorOut

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in [
        (401, "missing or invalid API key"),
        (404, "unknown stream or model"),
        (409, "stream exists, out-of-order observation, or state made by another model"),
        (413, "batch or body over the configured limit"),
        (422, "invalid request; `field` names the offending field"),
        (503, "state store unavailable (see Retry-After)"),
    ]
}


def _field(loc: tuple[Any, ...]) -> str:
    # drop pydantic's union branch tags ("list[float]", "function-after[...]") from the path
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    if parts and parts[0] == "body":
        parts = parts[1:] or ["body"]
    return ".".join(parts) or "body"


# FastAPI's 400 when the JSON parser itself fails (too deeply nested: RecursionError; other
# errors than JSONDecodeError, which FastAPI already reports as a 422)
BODY_PARSE_ERROR = "There was an error parsing the body"


def unparseable_body(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The documented 422 shape for a body that JSON could not parse at all."""
    request.app.state.metrics.error("invalid_request")
    cause = exc.__cause__
    reason = "nested too deeply" if isinstance(cause, RecursionError) else "malformed"
    message = f"the body is not valid JSON ({reason})"
    error = {"type": "invalid_request", "message": message, "field": "body"}
    return JSONResponse({"error": {**error, "details": [{"field": "body", "message": message}]}}, 422)


def install_error_handlers(app: FastAPI) -> None:
    def count(request: Request, kind: str) -> None:
        request.app.state.metrics.error(kind)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        count(request, exc.type)
        return JSONResponse(exc.body(), status_code=status_for(exc), headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, "invalid_request")
        errors = [
            {
                "field": _field(tuple(e.get("loc", ()))),
                "message": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        # a union (values as list or dict) reports each branch; the deepest path is the informative one
        first = max(
            errors,
            key=lambda e: e["field"].count("."),
            default={"field": "body", "message": "invalid request"},
        )
        if first.get("type") == "json_invalid":
            first = {**first, "field": "body", "message": "malformed JSON"}
            errors = [first]
        body = {
            "error": {
                "type": "invalid_request",
                "message": first["message"],
                "field": first["field"],
                "details": errors,
            }
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            return unparseable_body(request, exc)
        kind = "not_found" if exc.status_code == 404 else "http_error"
        count(request, kind)
        return JSONResponse(
            {"error": {"type": kind, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        count(request, "internal")
        return JSONResponse(
            {"error": {"type": "internal", "message": "internal server error"}}, status_code=500
        )
