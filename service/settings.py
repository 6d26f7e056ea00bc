"""Service settings, read from the environment (prefix ``MEMCAST_``) by pydantic-settings.

Obtain them through :func:`get_settings` (cached) or pass a :class:`Settings` to
``create_app``; nothing imports a module-level settings object.

==============================  ==========================================================
``MEMCAST_REDIS_URL``           unset: the embedded in-process store (one process only)
``MEMCAST_REDIS_KEY_PREFIX``    key prefix (``memcast`` -> ``memcast:{stream_id}``)
``MEMCAST_CHECKPOINT_DIR``      every checkpoint under it is loaded (default ``checkpoints``)
``MEMCAST_DEFAULT_MODEL``       model for streams created without one (default: first by name)
``MEMCAST_API_KEYS``            comma-separated; unset or empty: no authentication
``MEMCAST_MAX_BATCH``           observations per request (413 above)
``MEMCAST_MAX_HISTORY``         history rows when creating a stream (413 above)
``MEMCAST_MAX_BODY_BYTES``      request body size (413 above)
``MEMCAST_WORKERS_THREADS``     threads computing models
``MEMCAST_BATCH_STREAMS``       streams sharing one model call (1: no cross-stream batching)
``MEMCAST_STORE_RETRIES``       compare-and-set attempts per request before 503
``MEMCAST_DEDUP_WINDOW``        applied observations remembered for duplicates (>= max batch)
``MEMCAST_LOG_LEVEL``, ``MEMCAST_HOST``, ``MEMCAST_PORT``, ``MEMCAST_DEVICE``: as named
==============================  ==========================================================
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMCAST_", extra="ignore")

    # state store: unset -> the embedded in-process store (one process only)
    redis_url: str | None = None
    redis_key_prefix: str = "memcast"
    store_retries: int = Field(16, ge=1, description="compare-and-set attempts per request")
    store_timeout_s: float = Field(2.0, gt=0, description="Redis socket and connect timeout")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 responses")

    # models
    checkpoint_dir: Path = Path("checkpoints")
    default_model: str | None = None
    device: str = "cpu"
    workers_threads: int = Field(2, ge=1, description="threads running model computation")
    batch_streams: int = Field(
        32, ge=1, description="most streams whose single observations share one model call (1: off)"
    )
    batch_slots: int = Field(
        1, ge=1, description="model calls in flight at once per model and mode (the rest queue and batch)"
    )
    torch_threads: int | None = Field(1, ge=1, description="torch intra-op threads; unset leaves torch's")

    # requests
    api_keys: str | None = None  # comma-separated; unset or empty: no authentication
    max_batch: int = Field(1000, ge=1, description="observations per request")
    max_history: int = Field(20_000, ge=0, description="history rows when creating a stream")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1)
    dedup_window: int = Field(
        1024,
        ge=1,
        description="applied observations remembered to acknowledge re-posts (at least max_batch are)",
    )
    request_timeout_s: float = Field(60.0, gt=0, description="replay client timeout")

    # process
    log_level: str = "info"
    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("log_level")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in (self.api_keys or "").split(",") if k.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
