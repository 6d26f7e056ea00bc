"""Stream frequencies, without pandas: parse ``<count><unit>`` and date forecast horizons.

Accepted forms (``count`` is a positive integer, 1 when absent):

* an integer step, ``"5"``: for streams whose timestamps are integer steps;
* a fixed length, ``"15min"``: units ``s``/``S`` (seconds), ``min``/``T`` (minutes),
  ``h``/``H`` (hours), ``D``/``d`` (days), ``W`` (weeks of exactly 7 days, not anchored to a
  weekday as pandas' ``W-SUN`` is);
* a calendar period, ``"MS"``: month, quarter or year starts (``MS``, ``QS``, ``YS``) and ends
  (``ME``, ``QE``, ``YE``; quarters end in March, June, September and December), with pandas'
  meaning: the k-th step from a timestamp is the k-th period boundary after it, at the same
  time of day, so a timestamp that is not on a boundary rolls forward to the next one first.

Anything else, zero, negative counts and spans past what a datetime can hold are refused with
:class:`FreqError`, a ``ValueError`` whose message says what is accepted.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

FIXED_SECONDS = {
    "s": 1,
    "S": 1,
    "min": 60,
    "T": 60,
    "h": 3600,
    "H": 3600,
    "D": 86400,
    "d": 86400,
    "W": 7 * 86400,
}
CALENDAR_MONTHS = {"M": 1, "Q": 3, "Y": 12}  # + "S" (start) or "E" (end)
MAX_SPAN = timedelta(days=366 * 10_000)  # more than a datetime can span: refused outright
_FORM = re.compile(r"([0-9]{1,30})?([A-Za-z]{1,3})")
ACCEPTED = (
    "a positive integer step ('5'), or a positive count and a unit: s, min (T), h, D, W "
    "(fixed lengths) or MS, ME, QS, QE, YS, YE (calendar starts and ends), e.g. '15min', '2h', 'MS'"
)


class FreqError(ValueError):
    """A frequency that is malformed, not positive, or too large to date anything."""


@dataclass(frozen=True)
class Freq:
    """A parsed frequency: exactly one of ``step``, ``fixed`` and ``months`` is set."""

    text: str
    step: int | None = None  # integer timestamps
    fixed: timedelta | None = None
    months: int | None = None  # calendar: months per step (count times the period)
    period: int = 1  # calendar: months per period (1 month, 3 quarter, 12 year)
    at_end: bool = False  # calendar: period ends rather than starts

    def check_horizon(self, horizon: int) -> None:
        """Refuse a frequency whose ``horizon`` steps span more than any datetime range: no
        timestamp could be dated with it."""
        if self.fixed is not None and self.fixed > MAX_SPAN / horizon:
            raise FreqError(f"freq {self.text!r} times {horizon} steps spans more than 10,000 years")
        if self.months is not None and self.months * horizon > 12 * 10_000:
            raise FreqError(f"freq {self.text!r} times {horizon} steps spans more than 10,000 years")

    def after(self, last: datetime, k: int) -> datetime:
        """The k-th timestamp after ``last``; ``OverflowError`` past year 9999."""
        if self.fixed is not None:
            return last + self.fixed * k
        if self.months is None:
            raise FreqError(f"freq {self.text!r} is an integer step; this stream's timestamps are datetimes")
        return _calendar_after(last, self.months * k, self.period, self.at_end)


def parse(text: str) -> Freq:
    """Parse a frequency string; :class:`FreqError` names what is accepted."""
    if text.isdigit() and len(text) <= 30:
        step = int(text)
        if step <= 0:
            raise FreqError(f"freq {text!r} is not positive; {ACCEPTED}")
        return Freq(text, step=step)
    match = _FORM.fullmatch(text)
    if match is None:
        raise FreqError(f"freq {text!r} is not understood; {ACCEPTED}")
    count = int(match.group(1)) if match.group(1) is not None else 1
    unit = match.group(2)
    if count <= 0:
        raise FreqError(f"freq {text!r} is not positive; {ACCEPTED}")
    if unit in FIXED_SECONDS:
        try:
            fixed = timedelta(seconds=count * FIXED_SECONDS[unit])
        except OverflowError:
            raise FreqError(f"freq {text!r} is longer than any datetime range") from None
        if fixed > MAX_SPAN:
            raise FreqError(f"freq {text!r} is longer than any datetime range")
        return Freq(text, fixed=fixed)
    if len(unit) == 2 and unit[0] in CALENDAR_MONTHS and unit[1] in "SE":
        period = CALENDAR_MONTHS[unit[0]]
        if count * period > 12 * 10_000:
            raise FreqError(f"freq {text!r} is longer than any datetime range")
        return Freq(text, months=count * period, period=period, at_end=unit[1] == "E")
    raise FreqError(f"freq {text!r} has an unknown unit {unit!r}; {ACCEPTED}")


def _calendar_after(last: datetime, months: int, period: int, at_end: bool) -> datetime:
    """Step ``months`` (a multiple of ``period``) along the period boundaries after ``last``.

    Periods are aligned to January (months 0, period, 2 * period, ... of a year); the
    boundary is the first day of a period (starts) or the last day of its last month (ends).
    """
    index = last.year * 12 + last.month - 1  # months since year 0
    first = index - index % period  # first month of the period holding ``last``
    if at_end:
        end_month = first + period - 1
        on_end = index == end_month and last.day == calendar.monthrange(last.year, last.month)[1]
        # off an end, the end of the current period is the first step
        target = end_month + months - (0 if on_end else period)
    else:
        target = first + months  # on a start or not, the next start is the next period's
    year, month0 = divmod(target, 12)
    if not 1 <= year <= 9999:
        raise OverflowError(f"year {year} is out of range")
    day = calendar.monthrange(year, month0 + 1)[1] if at_end else 1
    return last.replace(year=year, month=month0 + 1, day=day)
