"""Forecasting models with explicit, batched, serialisable per-stream state (pure PyTorch)."""

from models.base import StorePolicy
from models.config import CMSConfig, ConfigError, FSNetConfig, ModelConfig, NeuralMemoryConfig
from models.forecaster import ContinualForecaster
from models.online import (
    Feedback,
    UpdateMode,
    ensure_mode,
    init_stream_state,
    is_ready,
    learn,
    observe,
    observe_many,
    predict,
)
from models.state_io import (
    FingerprintMismatchError,
    StateFormatError,
    model_fingerprint,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
)

__all__ = [
    "CMSConfig",
    "ConfigError",
    "ContinualForecaster",
    "FSNetConfig",
    "Feedback",
    "FingerprintMismatchError",
    "ModelConfig",
    "NeuralMemoryConfig",
    "StateFormatError",
    "StorePolicy",
    "UpdateMode",
    "ensure_mode",
    "init_stream_state",
    "is_ready",
    "learn",
    "model_fingerprint",
    "observe",
    "observe_many",
    "predict",
    "state_from_bytes",
    "state_nbytes",
    "state_to_bytes",
]
