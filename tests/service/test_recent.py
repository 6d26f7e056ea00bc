"""The duplicate window kept as JSON text: appending and trimming the text must give what
decoding, appending and re-encoding the pairs gives."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from service.store import StreamRecord
from service.store.recent import RecentWindow


def pairs(start: int, n: int, datetimes: bool = False) -> list[tuple[int | str, str]]:
    return [
        (f"2024-01-01T{i // 60 % 24:02d}:{i % 60:02d}:00+00:00" if datetimes else i, f"{i * 7919:016x}")
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("datetimes", [False, True])
def test_extending_the_text_equals_extending_the_pairs(datetimes: bool) -> None:
    rng = random.Random(0)
    window, start = 7, 0
    text = RecentWindow.from_json(orjson.dumps([]))
    decoded = RecentWindow()
    for _ in range(60):
        new = pairs(start, rng.choice([0, 1, 1, 2, 3, 9]), datetimes)
        start += len(new)
        text = RecentWindow.from_json(text.extended(new, window).to_json())  # as a record stores it
        decoded = RecentWindow((*decoded.pairs, *new)[-window:])
        assert len(text) == len(decoded) and text.last() == (decoded.pairs[-1] if decoded.pairs else None)
        assert text == decoded and text.to_json() == orjson.dumps(decoded.pairs)
        assert list(text) == [tuple(p) for p in json.loads(text.to_json())]


def test_a_window_written_with_spaces_reads_the_same() -> None:
    old = json.dumps(pairs(0, 4)).encode()  # json.dumps, as versions before orjson wrote it
    assert b" " in old
    window = RecentWindow.from_json(old)
    assert window.pairs == tuple(pairs(0, 4)) and len(window) == 4
    assert window.extended(pairs(4, 1), 3).pairs == tuple(pairs(2, 3))


def test_single_and_empty_windows() -> None:
    one = RecentWindow.from_json(orjson.dumps(pairs(5, 1)))
    assert len(one) == 1 and one.last() == pairs(5, 1)[0]
    empty = RecentWindow.from_json(b"[]")
    assert len(empty) == 0 and empty.last() is None and empty.extended([], 3) is empty
    assert empty.extended(pairs(0, 5), 3).pairs == tuple(pairs(2, 3))
    with pytest.raises(ValueError):
        RecentWindow.from_json(b'{"a": 1}')


def test_a_record_round_trips_its_window_through_its_fields() -> None:
    record = StreamRecord(
        "s", b"state", "m", "fp", "memory_only", "2", recent=tuple(pairs(0, 3, datetimes=True))
    )
    assert isinstance(record.recent, RecentWindow)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in record.to_fields().items()}
    again = StreamRecord.from_fields(fields)
    assert again == record and again.recent.pairs == tuple(pairs(0, 3, datetimes=True))
