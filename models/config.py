"""Model configuration: a frozen dataclass that checkpoints carry, so any process can rebuild
the model from a checkpoint directory alone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("lstm", "transformer", "tcn", "titans")
MEMORIES = ("titans", "cms", "fsnet", "fsnet_nomem", "none")
FUSIONS = ("add", "concat", "gated", "layer", "context")
MEMORY_MODELS = ("mlp", "attention")
MEMORY_VARIANTS = ("mlp", "simple", "advanced")
# field (dotted for nested groups) -> the values it accepts; the CLI offers them as choices
CHOICES: dict[str, tuple[str, ...]] = {
    "backbone": BACKBONES,
    "memory": MEMORIES,
    "fusion": FUSIONS,
    "neural_memory.model": MEMORY_MODELS,
    "neural_memory.variant": MEMORY_VARIANTS,
}
# fields added after checkpoints were written: at their default they do not enter the digest
# (an older checkpoint reads their defaults)
LATER_FIELDS = ("online_clip", "online_anchor", "outcome_lr", "corrector_lr", "analog_rows", "known_lr")
LATER_NESTED_FIELDS = {"neural_memory": ("max_grad_norm",)}  # the same, inside a nested config


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message says which field to change."""


@dataclass(frozen=True)
class NeuralMemoryConfig:
    """Titans NeuralMemory settings (Behrouz et al., 2025, section 3.1)."""

    # "mlp": plain MLP memory (gradient steps at a learned per-head rate, queries = keys);
    # "simple": adds momentum and forgetting (learned per-head gates);
    # "advanced": separate Q/K/V projections, per-token gates, gradient-based surprise (Titans)
    variant: str = "advanced"
    model: str = "mlp"  # inner memory network: "mlp" or "attention"
    depth: int = 2  # layers of the MLP memory
    expansion: float = 2.0  # hidden width of the MLP memory, relative to the head dimension
    heads: int = 2
    dim_head: int = 16
    chunk_size: int = 1  # tokens that share one gradient step
    batch_size: int | None = None  # commit weight updates only every this many tokens
    min_lr: float = 1e-3  # data-dependent learning rate theta is mapped exponentially into
    max_lr: float = 1.0  # [min_lr, max_lr] (keys have |k|^2 = dim_head, so 0.5 corrects ~all)
    max_grad_norm: float = 10.0  # each token's surprise clipped to this norm (0: none); see clip_surprise


@dataclass(frozen=True)
class CMSConfig:
    """HOPE's Continuum Memory System (memory ``cms``): one Titans memory level per frequency,
    each updated once every that many stored tokens (its levels share ``neural_memory``)."""

    frequencies: tuple[int, ...] = (1, 16, 256)


@dataclass(frozen=True)
class FSNetConfig:
    """FSNet fast-and-slow adaptation settings (Pham et al., ICLR 2023)."""

    gamma_long: float = 0.9
    gamma_short: float = 0.3
    tau: float = 0.75
    slots: int = 32
    top_k: int = 2
    temperature: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a :class:`~models.forecaster.ContinualForecaster`."""

    seq_len: int = 48
    pred_len: int = 12
    channels: int = 1  # input channels
    targets: tuple[int, ...] | None = None  # indices of forecast channels; None = all
    backbone: str = "lstm"
    memory: str = "titans"
    fusion: str = "add"
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    kernel_size: int = 3  # tcn
    dropout: float = 0.0
    revin: bool = True  # reversible instance normalisation of each window
    predict_delta: bool = True  # forecast the change from the last observed value
    linear_skip: bool = True  # channel-independent linear map from the window to the horizon
    neural_memory: NeuralMemoryConfig = field(default_factory=NeuralMemoryConfig)
    fsnet: FSNetConfig = field(default_factory=FSNetConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)
    # full_model online update (delayed targets): a per-stream AdamW step whose drift from the
    # pretrained weights is bounded (see models/online.py, "A step that cannot run away")
    online_lr: float = 3e-5  # per-stream AdamW learning rate (docs/investigations.md: 1e-4 lost on ETTh1-S)
    online_weight_decay: float = 0.0
    online_clip: float = 1.0  # max norm of a stream's gradient (0: no clipping)
    online_anchor: float = 10.0  # pull toward the pretrained weights: p <- p - lr anchor (p - p0)
    online_betas: tuple[float, float] = (0.9, 0.999)
    # memory_only online update from outcomes: when a forecast's horizon has been observed, an
    # SGD step of its loss on the stream's own memory weights only (gradient norm clipped to
    # online_clip); 0: the memory learns only its associative loss on the inputs (the seed's)
    outcome_lr: float = 0.03
    # memory_only per-stream output corrector (models/corrector.py): normalised LMS step size of
    # a linear map from the window and the forecast to the residual, learned from matured
    # pairs; 0: no corrector (forecasts are the forecaster's own)
    corrector_lr: float = 0.005
    # its normalised LMS step size on the values already known at a forecast's own target times:
    # used only when a pair is learned before the stream observes its horizon (immediate
    # feedback, the literature's protocol); the service never knows one. 0: not used
    known_lr: float = 0.1
    # memory_only per-stream analog mix (models/analog.py): rows of the stream's past values
    # kept to find the windows most like the current one; 0: no analog mix
    analog_rows: int = 2048

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            group, _, sub = name.rpartition(".")
            _check_choice(name, getattr(getattr(self, group) if group else self, sub), choices)
        nm = self.neural_memory
        if nm.model == "attention" and nm.chunk_size < 2:
            raise ConfigError(
                "neural_memory.model='attention' needs chunk_size >= 2: a chunk of one token attends "
                "only to itself (softmax = 1), so the memory's wq/wk would get zero gradient and its "
                "attention would never adapt"
            )
        if not self.cms.frequencies or min(self.cms.frequencies) < 1:
            raise ConfigError("cms.frequencies must be one or more update periods >= 1")
        if self.online_lr <= 0 or self.online_clip < 0 or not 0 <= self.online_lr * self.online_anchor < 1:
            raise ConfigError(
                "online_lr must be > 0, online_clip >= 0 and online_lr * online_anchor in [0, 1)"
            )
        if self.outcome_lr < 0:
            raise ConfigError("outcome_lr must be >= 0 (0: memory_only learns nothing from outcomes)")
        if not 0 <= self.corrector_lr < 2:
            raise ConfigError("corrector_lr must be in [0, 2) (normalised LMS; 0: no corrector)")
        if not 0 <= self.known_lr < 2:
            raise ConfigError("known_lr must be in [0, 2) (normalised LMS; 0: no known-value term)")
        if self.analog_rows < 0:
            raise ConfigError("analog_rows must be >= 0 (0: no analog mix)")
        if self.seq_len < 2 or self.pred_len < 1 or self.channels < 1:
            raise ConfigError("seq_len must be >= 2, pred_len and channels >= 1")
        # which components work together is declared by the components (models/registry.py)
        from models.registry import check_combination

        check_combination(self)
        for t in self.out_indices:
            if not 0 <= t < self.channels:
                raise ConfigError(f"target index {t} outside 0..{self.channels - 1}")

    @property
    def out_indices(self) -> tuple[int, ...]:
        return tuple(range(self.channels)) if self.targets is None else tuple(self.targets)

    @property
    def out_channels(self) -> int:
        return len(self.out_indices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        if "neural_memory" in data:
            data["neural_memory"] = NeuralMemoryConfig(**data["neural_memory"])
        if "fsnet" in data:
            data["fsnet"] = FSNetConfig(**data["fsnet"])
        if "cms" in data:
            cms = dict(data["cms"])
            cms["frequencies"] = tuple(cms.get("frequencies", CMSConfig.frequencies))
            data["cms"] = CMSConfig(**cms)
        for key in ("targets", "online_betas"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """Stable hash of the configuration (part of a model's fingerprint). Fields added after
        checkpoints were written are left out at their defaults, so those keep their fingerprint."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in LATER_FIELDS}
        data = {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}
        for name, later in LATER_NESTED_FIELDS.items():
            nested = getattr(self, name)
            data[name] = {
                k: v for k, v in data[name].items() if k not in later or v != getattr(type(nested), k)
            }
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
