"""Explicit name -> class registries used by the trainer, the checkpoint loader and the service.

Names come from :class:`~models.config.ModelConfig` (validated there); nothing is imported
from a string.
"""

from __future__ import annotations

from collections.abc import Iterator

from models.backbones import LSTMBackbone, TransformerBackbone
from models.base import Backbone, MemoryUnit
from models.cms import ContinuumMemory
from models.config import BACKBONES, FUSIONS, MEMORIES, ConfigError, ModelConfig
from models.neural_memory import NeuralMemory
from models.tcn import TCNBackbone
from models.titans_backbone import TitansBackbone

BACKBONE_CLASSES: dict[str, type[Backbone]] = {
    "lstm": LSTMBackbone,
    "transformer": TransformerBackbone,
    "tcn": TCNBackbone,
    "titans": TitansBackbone,
}

# Memory units that can sit beside a backbone. A backbone may also build a memory inside itself
# (its class's ``integrated_memories``: FSNet in the tcn, NeuralMemory in every titans layer).
MEMORY_CLASSES: dict[str, type[MemoryUnit]] = {"titans": NeuralMemory, "cms": ContinuumMemory}


def check_combination(config: ModelConfig) -> None:
    """Refuse a backbone/memory/fusion the components cannot build, from what their classes
    declare (``ModelConfig`` calls this, so a bad combination fails where it is written)."""
    backbone = BACKBONE_CLASSES[config.backbone]
    if config.memory == "none":
        return
    inside = config.memory in backbone.integrated_memories
    beside = config.memory in MEMORY_CLASSES and backbone.takes_side_memory and not inside
    if not (inside or beside):
        options = [
            *backbone.integrated_memories,
            *(MEMORY_CLASSES if backbone.takes_side_memory else ()),
            "none",
        ]
        raise ConfigError(
            f"memory {config.memory!r} does not work with backbone {config.backbone!r}: it takes "
            f"{', '.join(repr(m) for m in dict.fromkeys(options))}"
        )
    if (beside or backbone.fuses_integrated_memory) and config.fusion not in backbone.fusions:
        raise ConfigError(
            f"fusion {config.fusion!r} does not work with backbone {config.backbone!r}: use one of "
            f"{', '.join(backbone.fusions)}"
        )


def build_backbone(config: ModelConfig) -> Backbone:
    return BACKBONE_CLASSES[config.backbone](config)


def build_memory(config: ModelConfig) -> MemoryUnit | None:
    """The memory unit beside the backbone, if the configuration has one there."""
    if config.memory in BACKBONE_CLASSES[config.backbone].integrated_memories:
        return None
    cls = MEMORY_CLASSES.get(config.memory)
    return cls(config) if cls is not None else None


def supported_combinations() -> Iterator[tuple[str, str, str]]:
    """Every distinct (backbone, memory, fusion) the configuration accepts.

    Fusion only matters where a NeuralMemory meets the backbone, so other memories are listed
    once, with the default fusion.
    """
    for backbone in BACKBONES:
        for memory in MEMORIES:
            fuses = memory == "titans"
            for fusion in FUSIONS if fuses else ("add",):
                try:
                    ModelConfig(backbone=backbone, memory=memory, fusion=fusion)
                except ConfigError:
                    continue
                yield backbone, memory, fusion
