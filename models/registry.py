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

# Memory units read beside the backbone. FSNet adapts the tcn backbone's convolutions and the
# titans backbone integrates its own NeuralMemory per layer, so neither adds a unit here.
MEMORY_CLASSES: dict[str, type[MemoryUnit]] = {"titans": NeuralMemory, "cms": ContinuumMemory}


def build_backbone(config: ModelConfig) -> Backbone:
    return BACKBONE_CLASSES[config.backbone](config)


def build_memory(config: ModelConfig) -> MemoryUnit | None:
    if config.backbone == "titans" or config.memory not in MEMORY_CLASSES:
        return None
    return MEMORY_CLASSES[config.memory](config)


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
