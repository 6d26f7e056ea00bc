"""Per-stream state <-> bytes, through safetensors (no pickle), and model fingerprints.

A blob carries, in its safetensors metadata, the schema version, the fingerprint of the model
that made it, the batch size and the paths of empty sub-states (which flat tensor maps cannot
otherwise express), plus any caller metadata (strings).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tensordict import TensorDict
from torch import nn

STATE_SCHEMA_VERSION = "2"  # 2: memory weights are the learned change from the pretrained ones
_RESERVED = ("memcast.schema", "memcast.fingerprint", "memcast.batch", "memcast.empty")


class StateFormatError(ValueError):
    """Bytes that are not a memcast state of this schema version."""


class FingerprintMismatchError(ValueError):
    """A state made by a different model (for example after a checkpoint change)."""

    def __init__(self, found: str, expected: str) -> None:
        super().__init__(
            f"state was made by model {found[:12]}, but the loaded model is {expected[:12]}; "
            "reset the stream to start it again with the current model"
        )
        self.found, self.expected = found, expected


def model_fingerprint(model: nn.Module, config_digest: str = "") -> str:
    """A hash of a model's configuration and shared weights: equal only for the same model."""
    h = hashlib.sha256(config_digest.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_to_bytes(state: TensorDict, fingerprint: str, metadata: dict[str, str] | None = None) -> bytes:
    extra = dict(metadata or {})
    if any(k in _RESERVED for k in extra):
        raise ValueError(f"metadata keys {_RESERVED} are reserved")
    flat = state.flatten_keys(".")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in flat.items()}
    meta = {
        "memcast.schema": STATE_SCHEMA_VERSION,
        "memcast.fingerprint": fingerprint,
        "memcast.batch": str(state.batch_size[0]),
        "memcast.empty": json.dumps(_empty_paths(state)),
        **extra,
    }
    return st_save(tensors, metadata=meta)


def states_to_bytes(
    state: TensorDict, fingerprint: str, metadata: dict[str, str] | None = None
) -> list[bytes]:
    """One blob per stream of a ``[b]`` state, each what :func:`state_to_bytes` makes of
    ``state[i : i + 1]``; the keys, metadata and empty paths are worked out once for all."""
    extra = dict(metadata or {})
    if any(k in _RESERVED for k in extra):
        raise ValueError(f"metadata keys {_RESERVED} are reserved")
    flat = {k: v.detach().cpu().contiguous() for k, v in state.flatten_keys(".").items()}
    meta = {
        "memcast.schema": STATE_SCHEMA_VERSION,
        "memcast.fingerprint": fingerprint,
        "memcast.batch": "1",
        "memcast.empty": json.dumps(_empty_paths(state)),
        **extra,
    }
    return [
        st_save({k: v[i : i + 1].clone() for k, v in flat.items()}, metadata=meta)
        for i in range(state.batch_size[0])
    ]


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata of a state blob, read from its JSON header without loading tensors."""
    if len(data) < 8:
        raise StateFormatError("state blob is truncated")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise StateFormatError("state blob header is truncated")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError("state blob header is not JSON") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("memcast.schema") != STATE_SCHEMA_VERSION:
        raise StateFormatError(f"state schema {meta.get('memcast.schema')!r} is not {STATE_SCHEMA_VERSION!r}")
    return dict(meta)


def state_from_bytes(data: bytes, fingerprint: str | None = None) -> tuple[TensorDict, dict[str, str]]:
    """Decode a blob; with ``fingerprint`` given, refuse a state made by another model."""
    meta = read_metadata(data)
    if fingerprint is not None and meta["memcast.fingerprint"] != fingerprint:
        raise FingerprintMismatchError(meta["memcast.fingerprint"], fingerprint)
    try:
        tensors = st_load(data)
        batch = int(meta["memcast.batch"])
        state = TensorDict(tensors, batch_size=[batch]).unflatten_keys(".")
        for path in json.loads(meta["memcast.empty"]):
            state[tuple(path)] = TensorDict({}, batch_size=[batch])
    except (SafetensorError, RuntimeError, ValueError, KeyError) as exc:  # truncated or inconsistent
        raise StateFormatError(f"unreadable state: {exc}") from exc
    user = {k: v for k, v in meta.items() if k not in _RESERVED}
    return state, user


def state_nbytes(state: TensorDict) -> int:
    return sum(v.numel() * v.element_size() for v in state.flatten_keys(".").values())


def _empty_paths(td: TensorDict, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    paths: list[list[str]] = []
    for key, value in td.items():
        if isinstance(value, TensorDict):
            path = (*prefix, key)
            paths += [list(path)] if not list(value.keys()) else _empty_paths(value, path)
    return paths
