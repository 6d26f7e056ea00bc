"""Per-stream state <-> bytes, through safetensors (no pickle), and model fingerprints.

A blob carries, in its safetensors metadata, the schema version, the fingerprint of the model
that made it, the batch size and the paths of empty sub-states (which flat tensor maps cannot
otherwise express), plus any caller metadata (strings).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tensordict import TensorDict
from torch import Tensor, nn

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
    """One blob per stream of a ``[b]`` state, each byte for byte what :func:`state_to_bytes`
    makes of ``state[i : i + 1]``.

    Why not one ``safetensors`` save per stream: the streams of a batch share keys, shapes,
    dtypes and metadata, so they share the header too. The first stream is saved by safetensors
    (the reference layout); every other blob is that header plus the stream's row of one
    ``[b, bytes]`` matrix of all tensors' bytes, in the header's order. Measured on the
    benchmark's memory_only state (30 KB), 100 streams: 0.46 ms per stream before, a few
    hundredths after. A layout the shortcut does not reproduce falls back to one save per stream.
    """
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
    b = state.batch_size[0]
    if b == 0:
        return []
    signature = (tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in flat.items()), tuple(meta.items()))
    if signature in _HEADERS:  # a layout met before: its header, then each stream's bytes
        known = _HEADERS[signature]
    else:
        known = _learn_header(flat, meta, b)
        with _HEADERS_LOCK:  # (the service's model threads encode side by side)
            if len(_HEADERS) >= _MAX_HEADERS:
                _HEADERS.pop(next(iter(_HEADERS)))
            _HEADERS[signature] = known
    if known is None:  # a layout the shortcut does not reproduce: one save per stream
        return [st_save({k: v[i : i + 1].clone() for k, v in flat.items()}, metadata=meta) for i in range(b)]
    prefix, order = known
    rows = _rows(flat, order, b)  # [b, data bytes]; the signature holds the keys, so never None
    assert rows is not None
    return [prefix + rows[i].tobytes() for i in range(b)]


def _learn_header(flat: dict[str, Tensor], meta: dict[str, str], b: int) -> tuple[bytes, list[str]] | None:
    """The header and key order of the layout of ``flat``, from a safetensors save of its first
    stream; None unless that stream's bytes, in that order, are what the save wrote after it."""
    first = st_save({k: v[0:1].clone() for k, v in flat.items()}, metadata=meta)
    header_end, layout = _layout(first)
    order = [key for key, _, _ in layout]
    rows = _rows({k: v[0:1] for k, v in flat.items()}, order, 1)
    if rows is None or first[header_end:] != rows[0].tobytes():
        return None
    return first[:header_end], order


# layouts met by states_to_bytes: (keys, dtypes, shapes, metadata) -> (header bytes, key order),
# None for a layout the shortcut does not reproduce (saved stream by stream, without trying again);
# a model and mode has one, so a handful serve a server (a single stream's save was ~60% of its encoding)
_HEADERS: dict[tuple[object, ...], tuple[bytes, list[str]] | None] = {}
_MAX_HEADERS = 256
_HEADERS_LOCK = threading.Lock()


def states_from_bytes(blobs: Sequence[bytes], fingerprint: str | None = None) -> TensorDict:
    """Decode the blobs of several streams into one ``[b]`` state, as :func:`state_from_bytes`
    per blob and ``TensorDict.cat`` would. The blobs must share one header (the same model,
    mode and layout: what :func:`states_to_bytes` writes for streams of one batch);
    ``StateFormatError`` if they do not, or if the first is unreadable (decode those one by
    one). Why: one header parse and one copy for the whole batch instead of one safetensors
    load and one TensorDict per stream."""
    if not blobs:
        raise StateFormatError("no state blobs to decode")
    meta = read_metadata(blobs[0])
    if fingerprint is not None and meta["memcast.fingerprint"] != fingerprint:
        raise FingerprintMismatchError(meta["memcast.fingerprint"], fingerprint)
    if meta.get("memcast.batch") != "1":
        raise StateFormatError("states_from_bytes decodes single-stream blobs")
    header_end, layout = _layout(blobs[0])
    prefix = blobs[0][:header_end]
    size = len(blobs[0]) - header_end
    if any(len(blob) - header_end != size or not blob.startswith(prefix) for blob in blobs):
        raise StateFormatError("state blobs of different layouts")
    b = len(blobs)
    data = torch.frombuffer(bytearray(b"".join(blob[header_end:] for blob in blobs)), dtype=torch.uint8)
    data = data.reshape(b, size) if size else torch.zeros(b, 0, dtype=torch.uint8)
    flat: dict[str, Tensor] = {}
    for key, dtype, (shape, start, end) in layout:
        if shape[:1] != [1]:
            raise StateFormatError(f"tensor {key!r} of shape {shape} is not one stream's")
        raw = data[:, start:end].clone(memory_format=torch.contiguous_format)  # own, compact strides
        flat[key] = (raw.view(dtype) if raw.shape[1] else raw.to(dtype)).reshape(b, *shape[1:])
    try:
        state = TensorDict(flat, batch_size=[b]).unflatten_keys(".")
        for path in json.loads(meta["memcast.empty"]):
            state[tuple(path)] = TensorDict({}, batch_size=[b])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StateFormatError(f"unreadable state: {exc}") from exc
    return state


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _layout(blob: bytes) -> tuple[int, list[tuple[str, torch.dtype, tuple[list[int], int, int]]]]:
    """Where a blob's tensor data starts, and its tensors ``(key, dtype, (shape, start, end))``
    in the order of their bytes (offsets relative to the data)."""
    if len(blob) < 8:
        raise StateFormatError("state blob is truncated")
    (size,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8 : 8 + size])
        layout = [
            (key, _DTYPES[info["dtype"]], (list(info["shape"]), *info["data_offsets"]))
            for key, info in header.items()
            if key != "__metadata__"
        ]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StateFormatError(f"unreadable state header: {exc}") from exc
    layout.sort(key=lambda entry: entry[2][1])
    return 8 + size, layout


def _rows(flat: dict[str, Tensor], order: list[str], b: int) -> np.ndarray | None:
    """``[b, bytes]``: each stream's tensors' bytes, in ``order``; None if a tensor cannot be
    viewed as bytes."""
    if sorted(order) != sorted(flat):
        return None
    parts = [flat[key].reshape(b, -1) for key in order]
    as_bytes = [p.view(torch.uint8) if p.shape[1] else p.to(torch.uint8) for p in parts]
    return torch.cat(as_bytes, dim=1).numpy() if as_bytes else np.zeros((b, 0), dtype=np.uint8)


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
