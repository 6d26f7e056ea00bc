"""Domain errors of the service and the one table that maps them to HTTP.

::

    ServiceError
    ├── NotFound ............................ 404
    │   ├── StreamNotFound
    │   ├── SnapshotNotFound
    │   └── ModelNotFound
    ├── Conflict ............................ 409
    │   ├── StreamExists
    │   ├── SnapshotExists
    │   ├── OutOfOrder          (carries the last applied timestamp)
    │   └── StateIncompatible   (another model's state, e.g. after a checkpoint change: reset)
    ├── InvalidObservation .................. 422  (names the field)
    │   └── NonFiniteState  (the observations would make the state inf/NaN: not committed)
    ├── PayloadTooLarge ..................... 413
    ├── Unauthorized ........................ 401
    └── StoreUnavailable .................... 503  (with Retry-After)
        └── StoreContention  (compare-and-set retries exhausted)

Errors of the underlying libraries (redis-py) are translated into :class:`StoreUnavailable`
at the store boundary (``service.store.redis``) and nowhere else. Every error body is
``{"error": {"type", "message", "field"?, "details"?}}``.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    type: str = "error"

    def __init__(self, message: str, *, field: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.field, self.details = message, field, details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}

    def headers(self) -> dict[str, str]:
        return {}


class NotFound(ServiceError):
    type = "not_found"


class StreamNotFound(NotFound):
    type = "stream_not_found"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} does not exist", field="stream_id")


class SnapshotNotFound(NotFound):
    type = "snapshot_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"snapshot {name!r} does not exist", field="name")


class ModelNotFound(NotFound):
    type = "model_not_found"

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"model {name!r} is not loaded", field="model", details={"available": available})


class Conflict(ServiceError):
    type = "conflict"


class StreamExists(Conflict):
    type = "stream_exists"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} already exists", field="stream_id")


class SnapshotExists(Conflict):
    type = "snapshot_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"snapshot {name!r} already exists; delete it first", field="name")


class OutOfOrder(Conflict):
    type = "out_of_order"

    def __init__(self, message: str, *, index: int, last_timestamp: str | int | None) -> None:
        super().__init__(
            message,
            field=f"observations.{index}.timestamp",
            details={"index": index, "last_timestamp": last_timestamp},
        )
        self.last_timestamp = last_timestamp


class StateIncompatible(Conflict):
    type = "state_incompatible"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message + "; POST /v1/streams/{id}/reset starts the stream again", details=details)


class InvalidObservation(ServiceError):
    type = "invalid_request"


class NonFiniteState(InvalidObservation):
    """Learning from the observations produced inf or NaN in the state or forecast: such a
    state would poison every later forecast, so it is never written."""

    type = "non_finite_state"

    def __init__(self, field: str = "observations") -> None:
        super().__init__(
            "these observations make the model's state or forecast infinite or NaN (values far outside "
            "the range the model was trained on?); nothing was written",
            field=field,
        )


class PayloadTooLarge(ServiceError):
    type = "payload_too_large"


class Unauthorized(ServiceError):
    type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="memcast"'}


class StoreUnavailable(ServiceError):
    type = "store_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StoreContention(StoreUnavailable):
    type = "store_contention"


# The one table: most specific class first wins through the MRO walk in status_for().
HTTP_STATUS: dict[type[ServiceError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidObservation: 422,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    StoreUnavailable: 503,
    ServiceError: 500,
}


def status_for(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
