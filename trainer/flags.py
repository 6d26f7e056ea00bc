"""Command-line flags generated from :class:`TrainConfig` and :class:`ModelConfig`.

A field added to either dataclass becomes a flag without touching the CLI: its type comes from
the annotation, its help from the comment beside it, its choices from ``models.config.CHOICES``.
Nested model groups are dotted (``--neural-memory.chunk-size 4``). Every flag defaults to
``None`` (unset), so a checkpoint's recorded settings or the dataclass default apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from typing import Any

from models.config import CHOICES, ModelConfig
from trainer.train_config import DATA_DERIVED_MODEL_FIELDS, TRAIN_CHOICES, TrainConfig

DATA_FIELDS = ("data", "features", "target", "val_fraction", "test_fraction")
# set by each subcommand itself (out, name) or not a setting of the run (model: the group)
_NOT_FLAGS = ("model", "out", "name")


@dataclasses.dataclass(frozen=True)
class Flag:
    dest: str  # TrainConfig.build key: "epochs", "d_model", "neural_memory.chunk_size"
    option: str  # "--epochs", "--d-model", "--neural-memory.chunk-size"
    kwargs: dict[str, Any]


def train_flags() -> list[tuple[str, list[Flag]]]:
    """The flags of ``memcast pretrain`` and ``memcast evaluate``, by help group."""
    own = [f for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_FLAGS]
    data = [_flag(TrainConfig, f) for f in own if f.name in DATA_FIELDS]
    training = [_flag(TrainConfig, f) for f in own if f.name not in DATA_FIELDS]
    return [("data", data), ("model", list(_model_flags(ModelConfig, ""))), ("training", training)]


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    for title, flags in train_flags():
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(flag.option, dest=flag.dest, default=None, **flag.kwargs)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the user set, as ``TrainConfig.build`` keywords."""
    dests = [flag.dest for _, flags in train_flags() for flag in flags]
    return {d: getattr(args, d) for d in dests if getattr(args, d, None) is not None}


def _model_flags(cls: type, prefix: str) -> list[Flag]:
    flags: list[Flag] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not prefix and f.name in DATA_DERIVED_MODEL_FIELDS:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            flags += _model_flags(hints[f.name], f"{prefix}{f.name}.")
        else:
            flags.append(_flag(cls, f, prefix))
    return flags


def _flag(cls: type, f: dataclasses.Field[Any], prefix: str = "") -> Flag:
    dest = f"{prefix}{f.name}"
    option = "--" + dest.replace("_", "-")
    kind = _strip_optional(_hints(cls)[f.name])
    help_text = _comments(cls).get(f.name, "")
    if f.default is not dataclasses.MISSING:
        help_text = f"{help_text} (default {f.default})" if help_text else f"default {f.default}"
    kwargs: dict[str, Any] = {"help": help_text}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        variable = len(args) == 2 and args[1] is Ellipsis  # tuple[int, ...]
        kwargs.update(type=args[0], nargs="+" if variable else len(args), metavar=args[0].__name__.upper())
    else:
        kwargs.update(type=kind, metavar=getattr(kind, "__name__", "VALUE").upper())
        choices = CHOICES.get(dest) if prefix or cls is ModelConfig else TRAIN_CHOICES.get(dest)
        if choices:
            kwargs.update(choices=choices, metavar=None)
    return Flag(dest, option, kwargs)


def _strip_optional(kind: Any) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return kind


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """``field: type = default  # comment`` -> {field: comment}, read from the class source:
    the comment beside a field is its documentation, written once."""
    out: dict[str, str] = {}
    name, line_of_name = None, -1
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name, line_of_name = tok.string, tok.start[0]
        elif tok.type == tokenize.COMMENT and name is not None and tok.start[0] == line_of_name:
            out[name] = tok.string.lstrip("# ").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return out
