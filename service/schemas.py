"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from models.intervals import DEFAULT_LEVELS
from service.freq import parse as parse_freq

Mode = Literal["memory_only", "full_model", "none"]
# No braces: the id goes inside the Redis cluster hash tag ``memcast:{id}``.
StreamId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


def _no_float(value: object) -> object:
    if isinstance(value, float):
        raise ValueError("a timestamp is an integer step or an ISO 8601 datetime string")
    return value


TimestampIn = Annotated[StrictInt | datetime, BeforeValidator(_no_float)]
TimestampOut = int | str
Values = list[FiniteFloat] | dict[str, FiniteFloat]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Observation(_Strict):
    timestamp: TimestampIn = Field(description="integer step or ISO 8601 datetime; must increase")
    values: Values = Field(description="by column name, or a list in the model's column order")


class ObservationBatch(_Strict):
    """Either ``observations: [...]`` or a single ``timestamp`` + ``values``."""

    observations: list[Observation] | None = None
    timestamp: TimestampIn | None = None
    values: Values | None = None
    mode: Mode | None = Field(None, description="update mode for this request only")

    @model_validator(mode="after")
    def _one_form(self) -> ObservationBatch:
        single = self.timestamp is not None or self.values is not None
        if self.observations is not None and single:
            raise ValueError("give either observations or timestamp and values, not both")
        if self.observations is None and (self.timestamp is None or self.values is None):
            raise ValueError("give observations, or both timestamp and values")
        if self.observations is not None and not self.observations:
            raise ValueError("observations is empty")
        return self

    def items(self) -> list[Observation]:
        if self.observations is not None:
            return self.observations
        assert self.timestamp is not None and self.values is not None  # checked by _one_form
        return [Observation(timestamp=self.timestamp, values=self.values)]


class CreateStream(_Strict):
    id: StreamId | None = Field(None, description="generated when absent")
    # "" is refused (422) here and in ResetStream alike: absent means the default, empty is a mistake
    model: str | None = Field(None, min_length=1, description="a loaded model; the default model when absent")
    mode: Mode = "memory_only"
    combine: bool = Field(
        True,
        description=(
            "serve the per-stream combination of the frozen checkpoint, the stream's adapted model and the "
            "last value (Hedge weights per horizon step, learned from matured errors); false: serve the "
            "adapted model's forecast alone"
        ),
    )
    freq: str | None = Field(
        None,
        max_length=40,
        description=(
            "time between observations: a positive integer step ('5') for integer timestamps, or a count "
            "and a unit for datetimes: s, min, h, D, W, or calendar MS, ME, QS, QE, YS, YE ('15min', '2h'); "
            "the model's when absent"
        ),
    )
    history: list[Observation] = Field(default_factory=list, description="rows applied at creation")
    interval_levels: list[FiniteFloat] = Field(
        default_factory=lambda: list(DEFAULT_LEVELS),
        min_length=1,
        max_length=8,
        description="prediction-interval levels, each in (0, 1), learned from the stream's own errors",
    )

    @field_validator("interval_levels")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if not all(0.0 < v < 1.0 for v in value):
            raise ValueError("every interval level must be strictly between 0 and 1")
        if len(set(value)) != len(value):
            raise ValueError("interval levels must differ")
        return sorted(value)

    @field_validator("freq")
    @classmethod
    def _freq(cls, value: str | None) -> str | None:
        if value is not None:
            parse_freq(value)  # FreqError is a ValueError: a 422 naming freq
        return value


class CreateStreams(_Strict):
    streams: list[dict[str, Any]] = Field(
        min_length=1,
        description=(
            "stream specifications, each as the body of POST /v1/streams and validated on its own: a bad "
            "one is that stream's error only"
        ),
    )


class ResetStream(_Strict):
    model: str | None = Field(
        None, min_length=1, description="switch to this model (absent: keep the stream's)"
    )
    mode: Mode | None = None
    combine: bool | None = Field(
        None, description="serve the per-stream combination (absent: keep the stream's setting)"
    )


class BulkItem(Observation):
    """One item of ``POST /v1/observations``; validated item by item, so that a bad item is
    that item's (and its stream's) error, not the whole request's."""

    stream_id: StreamId


class BulkCreate(_Strict):
    """How to create the streams a bulk request names that do not exist yet."""

    model: str | None = Field(None, min_length=1, description="a loaded model; the default when absent")
    mode: Mode = "memory_only"
    combine: bool = Field(True, description="as in POST /v1/streams")
    freq: str | None = Field(
        None, max_length=40, description="as in POST /v1/streams; the model's when absent"
    )

    @field_validator("freq")
    @classmethod
    def _freq(cls, value: str | None) -> str | None:
        if value is not None:
            parse_freq(value)
        return value


class BulkObservations(_Strict):
    observations: list[dict[str, Any]] = Field(
        min_length=1,
        description=(
            "items `{stream_id, timestamp, values}` (as in POST /v1/streams/{id}/observations, plus the "
            "stream id), each validated on its own; several per stream are applied in time order"
        ),
    )
    forecasts: Literal["last", "none"] = Field("last", description="the latest forecast per stream, or none")
    mode: Mode | None = Field(None, description="update mode for this request only")
    create: BulkCreate | None = Field(
        None,
        description="create missing streams with this model and mode (absent: a missing stream is a 404)",
    )


class Interval(BaseModel):
    level: float = Field(description="nominal coverage, e.g. 0.95")
    lower: dict[str, float]
    upper: dict[str, float]


class ForecastRow(BaseModel):
    step: int
    timestamp: TimestampOut | None
    values: dict[str, float]
    lower: dict[str, float] | None = Field(
        None, description="lower bound at the stream's highest interval level; null until learned"
    )
    upper: dict[str, float] | None = Field(
        None, description="upper bound at the stream's highest interval level; null until learned"
    )
    intervals: list[Interval] = Field(
        default_factory=list, description="the bounds at every level, ascending; empty until learned"
    )


class Forecast(BaseModel):
    columns: list[str]
    levels: list[float] = Field(description="the stream's interval levels, ascending")
    rows: list[ForecastRow]


class ObservationStatus(BaseModel):
    timestamp: TimestampOut
    status: Literal["applied", "duplicate"]


class StreamStatus(BaseModel):
    stream_id: str
    model: str
    mode: Mode
    steps: int = Field(description="observations learned from")
    last_timestamp: TimestampOut | None
    ready: bool = Field(description="seq_len values seen: forecasts are meaningful")
    needs: int = Field(description="values still needed before the stream is ready")


class ObservationsOut(StreamStatus):
    applied: int
    duplicates: int
    observations: list[ObservationStatus]
    forecast: Forecast | None


class ForecastOut(StreamStatus):
    forecast: Forecast | None


class StepWeights(BaseModel):
    step: int = Field(description="horizon step, 1 = one step ahead")
    weights: dict[str, float] = Field(description="per expert; they sum to 1")


class Combination(BaseModel):
    """The weights the stream's served forecast gives its experts, learned from their matured
    errors (exponentiated weights with fixed share, per horizon step)."""

    experts: list[str] = Field(
        description=(
            "frozen: the checkpoint as pretrained; adapted: the stream's own model (its mode); "
            "last_value: the last observed value repeated"
        )
    )
    weights: dict[str, float] = Field(description="per expert, the mean over horizon steps; they sum to 1")
    steps: list[StepWeights] = Field(description="per horizon step")


class StreamOut(StreamStatus):
    combine: bool = Field(description="the served forecast is the combination below")
    combination: Combination | None = Field(description="null when the stream serves its adapted model alone")
    freq: str | None
    state_bytes: int
    version: int
    fingerprint: str
    compatible: bool = Field(description="made by the model now loaded under this name")
    created_at: str
    updated_at: str


class ModelOut(BaseModel):
    name: str
    default: bool
    fingerprint: str
    columns: list[str]
    targets: list[str]
    mean: list[float]
    std: list[float]
    seq_len: int
    pred_len: int
    freq: str | None
    features: str
    config: dict


class ModelsOut(BaseModel):
    default: str | None
    models: list[ModelOut]


class ItemError(BaseModel):
    type: str
    message: str
    field: str | None = None
    details: object | None = None


class BulkItemOut(BaseModel):
    stream_id: str | None
    timestamp: TimestampOut | None
    status: Literal["applied", "duplicate", "error"]
    code: int = Field(description="200, or the status code this item alone would have had")
    error: ItemError | None = None


class BulkStreamOut(BaseModel):
    stream_id: str
    code: int
    created: bool = False
    steps: int | None = None
    last_timestamp: TimestampOut | None = None
    ready: bool | None = None
    needs: int | None = None
    applied: int = 0
    duplicates: int = 0
    forecast: Forecast | None = None
    error: ItemError | None = None


class BulkObservationsOut(BaseModel):
    applied: int
    duplicates: int
    errors: int
    observations: list[BulkItemOut] = Field(description="one per item, in request order")
    streams: list[BulkStreamOut] = Field(description="one per stream named, in order of first mention")


class CreatedStreamOut(BaseModel):
    index: int = Field(description="the specification's position in the request")
    id: str | None = Field(description="the stream's id (generated when the specification gave none)")
    code: int = Field(description="201, or the status code creating this stream alone would have had")
    stream: StreamOut | None = None
    error: ItemError | None = None


class CreateStreamsOut(BaseModel):
    created: int
    errors: int
    streams: list[CreatedStreamOut] = Field(description="one per specification, in request order")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    details: object | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class Accuracy(BaseModel):
    """MAE and MSE of the served forecasts and of the last-value forecast over the same values
    (stream units, averaged over the target columns); ``skill = 1 - mae / last_value_mae``."""

    count: int = Field(description="values scored (per target column)")
    mae: float | None
    mse: float | None
    last_value_mae: float | None
    last_value_mse: float | None
    skill: float | None


class StepAccuracy(Accuracy):
    step: int = Field(description="horizon step, 1 = one step ahead")


class AccuracyWindow(Accuracy):
    steps: list[StepAccuracy]


class AccuracyOut(StreamStatus):
    columns: list[str] = Field(description="target columns the errors average over")
    window: int = Field(description="latest scored values per step in `recent`")
    pending: int = Field(description="served forecasts whose horizon has not fully matured")
    since_creation: AccuracyWindow
    recent: AccuracyWindow


class StreamsPage(BaseModel):
    streams: list[str] = Field(description="stream ids")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: no more")


class HistoryRow(BaseModel):
    timestamp: TimestampOut
    values: dict[str, float]
    forecast: dict[str, float] | None = Field(
        description="the target values the latest served forecast made for this row, if any"
    )
    forecast_step: int | None = Field(description="how many steps ahead that forecast was made")


class HistoryOut(StreamStatus):
    columns: list[str]
    targets: list[str]
    rows: list[HistoryRow] = Field(description="the latest observations the state holds, oldest first")


SnapshotName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


class CreateSnapshot(_Strict):
    name: SnapshotName


class SnapshotOut(BaseModel):
    name: str
    taken_at: str
    model: str
    mode: Mode
    steps: int
    last_timestamp: TimestampOut | None


class SnapshotsOut(BaseModel):
    snapshots: list[SnapshotOut]
