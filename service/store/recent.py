"""A stream's duplicate window: the ``(timestamp, values hash)`` pairs of its latest applied
observations (``service.observations`` explains the rule), held as the JSON text its record
stores and decoded only when something reads the pairs.

Why: the window holds up to ``MEMCAST_DEDUP_WINDOW`` pairs (1,000 by default: a quarter of a
steady-state record), and nearly every observation is after the last applied one, which only
appends to the window. Decoding 1,000 pairs into 3,000 Python objects and encoding them back on
every write was the record codec's largest part, and fed the cyclic collector. So the text is
trimmed and extended as text; only a re-post (a timestamp not after the last one), an export
or a page reads the pairs. The text is what ``orjson.dumps`` writes for the pairs (no spaces:
timestamps are integers or ISO 8601 strings, hashes are hex), so records stay plain JSON, and
a record written otherwise (with spaces, by an older version) is decoded once and re-encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import orjson

Timestamp = int | str  # an integer step or an ISO 8601 datetime, as the stream's client sent it
Pair = tuple[Timestamp, str]
_SEPARATOR = b"],["


class RecentWindow(Sequence[Pair]):
    """Immutable, like the record that holds it: :meth:`extended` returns a new window."""

    __slots__ = ("_len", "_pairs", "_raw")

    def __init__(self, pairs: Iterable[Sequence[Timestamp | str]] = ()) -> None:
        self._pairs: tuple[Pair, ...] | None = tuple((p[0], str(p[1])) for p in pairs)
        self._raw: bytes | None = None
        self._len = len(self._pairs)

    @classmethod
    def from_json(cls, raw: bytes | str) -> RecentWindow:
        """The window a record's JSON text holds (decoded later, when read)."""
        text = raw.encode() if isinstance(raw, str) else bytes(raw)
        if not text.startswith(b"[") or not text.endswith(b"]"):
            raise ValueError("a duplicate window is a JSON list of [timestamp, hash] pairs")
        if any(c in text for c in (b" ", b"\n", b"\t", b"\r")):  # not orjson's compact form
            return cls(orjson.loads(text))
        window = cls.__new__(cls)
        window._raw, window._pairs = text, None
        window._len = text.count(_SEPARATOR) + 1 if len(text) > 2 else 0
        return window

    def to_json(self) -> bytes:
        if self._raw is None:
            self._raw = orjson.dumps(self._pairs)
        return self._raw

    @property
    def pairs(self) -> tuple[Pair, ...]:
        if self._pairs is None:
            assert self._raw is not None
            decoded = orjson.loads(self._raw)
            if not isinstance(decoded, list) or any(not isinstance(p, list) or len(p) != 2 for p in decoded):
                raise ValueError("a duplicate window is a JSON list of [timestamp, hash] pairs")
            self._pairs = tuple(map(tuple, decoded))  # type: ignore[arg-type]
        return self._pairs

    def last(self) -> Pair | None:
        """The latest pair, read without decoding the others."""
        if not self._len:
            return None
        if self._pairs is not None:
            return self._pairs[-1]
        assert self._raw is not None
        start = self._raw.rfind(_SEPARATOR) + 2 if self._len > 1 else 1
        ts, digest = orjson.loads(self._raw[start:-1])
        return ts, digest

    def extended(self, new: Sequence[Pair], window: int) -> RecentWindow:
        """This window then ``new``, the latest ``window`` pairs kept."""
        if not new and self._len <= window:
            return self
        total = self._len + len(new)
        drop = max(0, total - window)
        if self._raw is None or drop >= self._len:
            return RecentWindow((*self.pairs[drop:], *new[max(0, drop - self._len) :]))
        body, start = self._raw[1:-1], 0
        for _ in range(drop):
            start = body.index(_SEPARATOR, start) + 2
        kept = body[start:]
        added = orjson.dumps(new)[1:-1]
        out = RecentWindow.__new__(RecentWindow)
        out._raw = b"[" + kept + (b"," if kept and added else b"") + added + b"]"
        out._pairs, out._len = None, total - drop
        return out

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> Pair: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Pair, ...]: ...
    def __getitem__(self, index: int | slice) -> Pair | tuple[Pair, ...]:
        return self.pairs[index]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecentWindow):
            if self._raw is not None and other._raw is not None:
                return self._raw == other._raw
            return self.pairs == other.pairs
        if isinstance(other, tuple | list):
            return self.pairs == tuple(tuple(p) for p in other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.pairs)

    def __repr__(self) -> str:
        return f"RecentWindow({len(self)} pairs)"
