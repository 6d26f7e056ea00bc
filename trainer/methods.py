"""The methods ``memcast evaluate --methods`` compares, and where their checkpoints come from.

Each method is a model (a checkpoint) plus an update mode, except ``naive``:

=================== ======================================== ==============================
name                model                                    online update
=================== ======================================== ==============================
naive               none: the last value, repeated           none
memcast             ``--checkpoint``, else the flags' model  ``--mode``
titans_<mode>       the flags' model with memory ``titans``  <mode>
ogd                 tcn backbone, no memory                  full_model
er                  tcn backbone, no memory                  full_model + experience replay
fsnet               tcn + FSNet memory                       full_model
fsnet_nomem         tcn + FSNet without associative memory   full_model
combo_<mode>        per-stream combination of titans_none,   <mode> (its adapted expert)
                    titans_<mode> and naive (Hedge weights
                    learned from matured errors)
PATH[@<mode>]       the checkpoint directory PATH            <mode> (default ``--mode``)
=================== ======================================== ==============================

Models the flags describe are pretrained with the same :class:`TrainConfig` when missing and
cached under ``runs_dir`` keyed by a hash of the config and the data file's content.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.checkpoint import REPORT_FILE, Checkpoint, is_checkpoint, load_checkpoint
from models.online import UpdateMode
from models.registry import BACKBONE_CLASSES
from trainer.pretrain import pretrain
from trainer.train_config import TrainConfig, file_identity

log = logging.getLogger(__name__)

MODES = tuple(m.value for m in UpdateMode)


class MethodError(ValueError):
    """A ``--methods`` entry that names no method."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mode: UpdateMode
    model: dict[str, Any] | None = None  # TrainConfig overrides; None: naive or a given checkpoint
    checkpoint: Path | None = None  # an explicit checkpoint directory
    replay: bool = False
    experts: tuple[str, ...] = ()  # a combination: the methods whose forecasts it weighs

    @property
    def needs_model(self) -> bool:
        return self.name != "naive" and not self.experts


_TCN = {"backbone": "tcn", "memory": "none"}
BASELINES: dict[str, tuple[dict[str, Any] | None, UpdateMode, bool]] = {
    "naive": (None, UpdateMode.NONE, False),
    "ogd": (_TCN, UpdateMode.FULL_MODEL, False),
    "er": (_TCN, UpdateMode.FULL_MODEL, True),
    "fsnet": ({"backbone": "tcn", "memory": "fsnet"}, UpdateMode.FULL_MODEL, False),
    "fsnet_nomem": ({"backbone": "tcn", "memory": "fsnet_nomem"}, UpdateMode.FULL_MODEL, False),
}


def parse_method(token: str, default_mode: UpdateMode, checkpoint: Path | None) -> MethodSpec:
    token = token.strip()
    if token in BASELINES:
        model, mode, replay = BASELINES[token]
        return MethodSpec(token, mode, model, replay=replay)
    if token == "memcast":
        return MethodSpec(token, default_mode, None if checkpoint else {}, checkpoint=checkpoint)
    if token.startswith("combo_") and token.removeprefix("combo_") in MODES:
        mode = UpdateMode(token.removeprefix("combo_"))
        return MethodSpec(token, mode, experts=combo_experts(mode))
    if token.startswith("titans_") and token.removeprefix("titans_") in MODES:
        return MethodSpec(token, UpdateMode(token.removeprefix("titans_")), {"memory": "titans"})
    path, _, mode_name = token.partition("@")
    if is_checkpoint(Path(path)):
        if mode_name and mode_name not in MODES:
            raise MethodError(f"{token!r}: mode {mode_name!r} is not one of {', '.join(MODES)}")
        chosen = UpdateMode(mode_name) if mode_name else default_mode
        return MethodSpec(f"{Path(path).name}@{chosen.value}", chosen, None, checkpoint=Path(path))
    raise MethodError(
        f"unknown method {token!r}: use naive, memcast, ogd, er, fsnet, fsnet_nomem, "
        f"titans_<{'|'.join(MODES)}>, combo_<{'|'.join(MODES)}> or a checkpoint directory [@mode]"
    )


def combo_experts(mode: UpdateMode) -> tuple[str, ...]:
    """The frozen checkpoint, its copy adapted online with ``mode``, and the last value."""
    adapted = f"titans_{mode.value}"
    return ("titans_none", adapted, "naive") if mode is not UpdateMode.NONE else ("titans_none", "naive")


def with_experts(specs: list[MethodSpec], default_mode: UpdateMode) -> list[MethodSpec]:
    """``specs`` plus every combination's experts that are not listed, experts first (a
    combination is computed from their forecasts, and the table shows it beside them)."""
    names = {s.name for s in specs}
    missing = [e for s in specs for e in s.experts if e not in names]
    extra = [parse_method(e, default_mode, None) for e in dict.fromkeys(missing)]
    plain = [s for s in specs if not s.experts]
    return plain + extra + [s for s in specs if s.experts]


def parse_methods(
    tokens: str | list[str] | tuple[str, ...], default_mode: UpdateMode, checkpoint: Path | None
) -> list[MethodSpec]:
    if isinstance(tokens, str):
        tokens = [t for t in tokens.split(",") if t.strip()]
    specs = [parse_method(t, default_mode, checkpoint) for t in tokens]
    names = [s.name for s in specs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise MethodError(f"methods listed twice: {sorted(duplicates)}")
    return specs


def train_config_for(spec: MethodSpec, base: TrainConfig) -> TrainConfig | None:
    """The pretraining config of a method's model (None when it has no model to pretrain)."""
    if spec.model is None:
        return None
    changes = dict(spec.model)
    backbone = BACKBONE_CLASSES[changes.get("backbone", base.model.backbone)]
    if not backbone.takes_side_memory and changes.get("memory", base.model.memory) not in (
        *backbone.integrated_memories,
        "none",
    ):
        changes["memory"] = backbone.integrated_memories[0]  # e.g. titans_<mode> on the titans backbone
    return base.replace(**changes)


def checkpoint_for(spec: MethodSpec, base: TrainConfig, runs_dir: Path, device: str) -> Checkpoint:
    """Load the method's checkpoint, pretraining it first when it is not in the cache."""
    if spec.checkpoint is not None:
        return load_checkpoint(spec.checkpoint, device)
    cfg = train_config_for(spec, base)
    if cfg is None:
        raise MethodError(f"method {spec.name!r} has no model")
    digest = cfg.digest(file_identity(cfg.data))[:12]
    out = runs_dir / f"{cfg.model.backbone}-{cfg.model.memory}-{digest}"
    if _finished(out):
        log.info("%s: using the cached checkpoint %s", spec.name, out)
    else:
        log.info("%s: pretraining %s/%s into %s", spec.name, cfg.model.backbone, cfg.model.memory, out)
        pretrain(cfg.replace(out=str(out), name=out.name))
    return load_checkpoint(out, device)


def _finished(directory: Path) -> bool:
    if not is_checkpoint(directory) or not (directory / REPORT_FILE).is_file():
        return False
    report = json.loads((directory / REPORT_FILE).read_text())
    return bool(report.get("finished"))
