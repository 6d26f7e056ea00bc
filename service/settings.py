"""Service settings, read from the environment (prefix ``MEMCAST_``) by pydantic-settings.

Obtain them through :func:`get_settings` (cached) or pass a :class:`Settings` to
``create_app``; nothing imports a module-level settings object. Each field's description is
its documentation: ``memcast settings`` prints the table the README carries (a test keeps the
two equal).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMCAST_", extra="ignore")

    # state store
    redis_url: str | None = Field(
        None,
        description="`redis://host:6379/0`, or a Redis Cluster: `redis+cluster://host:6379` (any node); "
        "unset: the embedded in-process store (one process only)",
    )
    redis_key_prefix: str = Field("memcast", description="key prefix: `memcast` -> `memcast:{stream_id}`")
    store_retries: int = Field(16, ge=1, description="compare-and-set attempts per request before 503")
    store_timeout_s: float = Field(2.0, gt=0, description="Redis socket and connect timeout, seconds")
    retry_after_s: int = Field(1, ge=0, description="`Retry-After` seconds sent with 503 responses")
    record_cache_mb: float = Field(
        32,
        ge=0,
        description="MiB of stream records kept in the process (Redis only) so a stream's next write "
        "skips its read; each is checked by the write's compare-and-set. Size it to the streams "
        "written often (about 140 KB each at the default windows); 0: off",
    )

    # models
    checkpoint_dir: Path = Field(
        Path("checkpoints"), description="every checkpoint directory in it is loaded at start-up"
    )
    default_model: str | None = Field(
        None, description="model for streams created without one; unset: the first checkpoint by name"
    )
    device: str = Field("cpu", description="torch device (`cpu`, `cuda`, `cuda:1`)")
    workers_threads: int = Field(2, ge=1, description="threads running model computation")
    processes: int = Field(
        1,
        ge=1,
        description="server processes sharing the port (uvicorn workers); above 1 needs `MEMCAST_REDIS_URL`",
    )
    batch_streams: int = Field(
        32, ge=1, description="most streams whose single observations share one model call (1: off)"
    )
    batch_slots: int = Field(
        1, ge=1, description="model calls in flight at once per model and mode (the rest queue and batch)"
    )
    torch_threads: int | None = Field(1, ge=1, description="torch intra-op threads; unset leaves torch's")

    # requests
    api_keys: str | None = Field(
        None,
        description="comma-separated keys (`Authorization: Bearer ...` or `X-API-Key`); unset or empty: "
        "no authentication",
    )
    max_batch: int = Field(1000, ge=1, description="observations per request (413 above)")
    max_history: int = Field(20_000, ge=0, description="history rows when creating a stream (413 above)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="request body size in bytes (413 above)")
    dedup_window: int = Field(
        1024,
        ge=1,
        description="applied observations remembered to acknowledge re-posts (at least max_batch are)",
    )
    stream_ttl_s: float | None = Field(
        None,
        gt=0,
        description="delete a stream and its snapshots after this many seconds without a write; unset: never",
    )
    accuracy_window: int = Field(
        48, ge=1, description="scored values per horizon step in a stream's recent accuracy window"
    )

    # process
    log_level: str = Field("info", description="`debug`, `info`, `warning` or `error`")
    host: str = Field("127.0.0.1", description="bind address of `memcast serve`")
    port: int = Field(8000, description="port of `memcast serve`")
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop of `memcast serve` (`auto`: uvloop when installed)"
    )
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="HTTP parser of `memcast serve` (`auto`: httptools when installed)"
    )

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


def settings_table() -> str:
    """The Markdown table of every setting, its default and its description (the README's)."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = "unset" if info.default is None else f"`{info.default}`"
        lines.append(f"| `{prefix}{name.upper()}` | {default} | {info.description} |")
    return "\n".join(lines) + "\n"
