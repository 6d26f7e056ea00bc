"""The batched state codec: blobs of many streams written and read in one go must be what the
one-stream codec writes and reads, for every model and update mode."""

from __future__ import annotations

import struct

import pytest
import torch
from tensordict import TensorDict

from models import UpdateMode, init_stream_state, model_fingerprint, observe_many, state_io
from models.state_io import (
    FingerprintMismatchError,
    StateFormatError,
    read_metadata,
    state_from_bytes,
    state_to_bytes,
    states_from_bytes,
    states_to_bytes,
)
from tests.models.test_forecaster import COMBOS, flat, make_model, series

B = 3


def warm(combo: tuple[str, str, str], mode: UpdateMode, combine: bool = False) -> tuple[TensorDict, str]:
    """``B`` streams, each fed its own series (so their states differ), and the fingerprint."""
    model = make_model(*combo)
    state = init_stream_state(model, B, mode, combine=combine)
    state, _ = observe_many(model, state, series(B, 14), mode)
    return state, model_fingerprint(model, model.config.digest())


def data(blob: bytes) -> bytes:
    (size,) = struct.unpack("<Q", blob[:8])
    return blob[8 + size :]


def assert_equal(a: TensorDict, b: TensorDict) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    assert set(a.keys(include_nested=True)) == set(b.keys(include_nested=True))  # empty sub-states too
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and torch.equal(fa[key], fb[key]), key


@pytest.mark.parametrize("mode", list(UpdateMode), ids=lambda m: m.value)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_batched_codec_equals_one_stream_at_a_time(combo: tuple[str, str, str], mode: UpdateMode) -> None:
    state, fp = warm(combo, mode, combine=mode is UpdateMode.MEMORY_ONLY)
    blobs = states_to_bytes(state, fp, {"model": "m"})
    singles = [state_to_bytes(state[i : i + 1], fp, {"model": "m"}) for i in range(B)]
    for got, want in zip(blobs, singles, strict=True):
        # safetensors writes the metadata in no fixed order: compare it, and the tensor bytes
        assert read_metadata(got) == read_metadata(want)
        assert len(got) == len(want) and data(got) == data(want)
    decoded = states_from_bytes(blobs, fp)
    assert decoded.batch_size == torch.Size([B])
    assert_equal(decoded, TensorDict.cat([state_from_bytes(b, fp)[0] for b in singles], dim=0))
    assert_equal(decoded, state)
    for i, blob in enumerate(blobs):  # one stream alone (a batch of one)
        assert_equal(states_from_bytes([blob], fp), state[i : i + 1])


def test_a_layout_met_before_encodes_from_its_remembered_header() -> None:
    """Later batches of a layout (any size, other values) reuse the first one's header: each
    blob still equals the one-stream codec's, and a changed value reaches the bytes."""
    state, fp = warm(COMBOS[0], UpdateMode.MEMORY_ONLY, combine=True)
    state_io._HEADERS.clear()
    states_to_bytes(state, fp, {"model": "m"})  # fills the cache
    assert len(state_io._HEADERS) == 1
    changed = state.clone()
    changed["history"] = changed["history"] + 1.0
    for batch in (changed, changed[1:2]):
        blobs = states_to_bytes(batch, fp, {"model": "m"})
        for i, got in enumerate(blobs):
            want = state_to_bytes(batch[i : i + 1], fp, {"model": "m"})
            assert read_metadata(got) == read_metadata(want) and data(got) == data(want)
        assert_equal(states_from_bytes(blobs, fp), batch)
    assert len(state_io._HEADERS) == 1
    states_to_bytes(changed, fp, {"model": "another"})  # other metadata: another header
    assert len(state_io._HEADERS) == 2


def test_blobs_of_different_layouts_or_models_are_refused_together() -> None:
    memory, fp = warm(("lstm", "titans", "add"), UpdateMode.MEMORY_ONLY)
    full, _ = warm(("lstm", "titans", "add"), UpdateMode.FULL_MODEL)
    mixed = states_to_bytes(memory, fp) + states_to_bytes(full, fp)
    with pytest.raises(StateFormatError, match="different layouts"):
        states_from_bytes(mixed, fp)
    with pytest.raises(FingerprintMismatchError):
        states_from_bytes(states_to_bytes(memory, fp), "another model")
    blob = states_to_bytes(memory, fp)[0]
    with pytest.raises(StateFormatError):
        states_from_bytes([blob, blob[:-4]], fp)  # a truncated one
    with pytest.raises(StateFormatError):
        states_from_bytes([blob[:5]], fp)
    with pytest.raises(StateFormatError):
        states_from_bytes([state_to_bytes(memory, fp)], fp)  # one blob holding several streams
