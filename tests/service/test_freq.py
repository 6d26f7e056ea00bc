"""service.freq: parsing, refusals, and forecast timestamps equal to pandas' offsets."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from service.freq import FreqError, parse


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("s", timedelta(seconds=1)),
        ("15min", timedelta(minutes=15)),
        ("T", timedelta(minutes=1)),
        ("h", timedelta(hours=1)),
        ("2H", timedelta(hours=2)),
        ("D", timedelta(days=1)),
        ("3W", timedelta(weeks=3)),
    ],
)
def test_parse_fixed_freq(text: str, fixed: timedelta) -> None:
    assert parse(text).fixed == fixed


def test_parse_integer_step() -> None:
    assert parse("5").step == 5 and parse("5").fixed is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "-3",
        "0h",
        "-2h",
        "00h",
        "h ",
        " h",
        "2 h",
        "1.5h",
        "fortnightly",
        "W-SUN",
        "M",
        "ms",
        "999999999999999999999h",
        "9999999999D",
        "100000YE",
        "1" * 40,
    ],
)
def test_parse_refuses_freq(text: str) -> None:
    with pytest.raises(FreqError, match="freq"):
        parse(text)


def test_check_horizon_refuses_span_past_datetime_range() -> None:
    parse("1000YS").check_horizon(3)
    with pytest.raises(FreqError, match="10,000 years"):
        parse("5000YS").check_horizon(3)
    with pytest.raises(FreqError, match="10,000 years"):
        parse("2000000D").check_horizon(2)


def test_after_past_year_9999_overflows() -> None:
    with pytest.raises(OverflowError):
        parse("YS").after(datetime(9999, 6, 1), 1)
    with pytest.raises(OverflowError):
        parse("D").after(datetime(9999, 12, 31), 1)


@pytest.mark.parametrize(
    "text", ["h", "15min", "D", "W", "MS", "ME", "2MS", "3ME", "QS", "QE", "2QE", "YS", "YE", "5YE"]
)
def test_after_matches_pandas_offsets(text: str) -> None:
    pd = pytest.importorskip("pandas")  # the service does not use pandas; its tests check against it
    offset = pd.tseries.frequencies.to_offset(text.replace("W", "7D"))
    rng = random.Random(text)
    freq = parse(text)
    for _ in range(200):
        last = datetime(2000, 1, 1) + timedelta(days=rng.randrange(0, 365 * 40), hours=rng.choice([0, 0, 13]))
        if rng.random() < 0.3:  # land on month ends and starts too
            last = last.replace(day=1) - timedelta(days=rng.choice([0, 1]))
        if rng.random() < 0.3:
            last = last.replace(tzinfo=timezone(timedelta(hours=rng.randrange(-12, 13))))
        for k in (1, 2, 5):
            assert freq.after(last, k) == (pd.Timestamp(last) + k * offset).to_pydatetime(), (last, k)


def test_after_keeps_the_time_zone() -> None:
    last = datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert parse("2h").after(last, 3) == datetime(2024, 3, 1, 16, tzinfo=UTC)
