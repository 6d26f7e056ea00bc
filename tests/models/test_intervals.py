"""Online prediction intervals (``models.intervals``): batched streams equal looped ones, the
errors mature in the delayed order, coverage converges to nominal on a stationary series where
a control without the learning step does not, and the radii follow the errors' units."""

from __future__ import annotations

import math

import pytest
import torch

from models.intervals import (
    IntervalConfig,
    coverage,
    init_state,
    matured_errors,
    replay,
    update,
)

LEVELS = torch.tensor([0.8, 0.95], dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spiky(n: int, p: int, c: int, seed: int = 0) -> torch.Tensor:
    """Errors a normal guess gets wrong: mostly small, a tenth of them large."""
    small = torch.randn(n, p, c, generator=gen(seed), dtype=torch.float64) * 0.1
    large = torch.randn(n, p, c, generator=gen(seed + 1), dtype=torch.float64) * 3.0
    pick = torch.rand(n, p, c, generator=gen(seed + 2), dtype=torch.float64) < 0.1
    return torch.where(pick, large, small)


def test_update_of_batched_streams_equals_looped() -> None:
    b, p, c = 4, 3, 2
    levels = torch.tensor([[0.8, 0.95], [0.5, 0.9], [0.8, 0.99], [0.6, 0.7]], dtype=torch.float64)
    cfg = IntervalConfig(lr=0.1, warmup=2, window=5)
    batched = init_state(b, p, levels, c)
    looped = [init_state(1, p, levels[i], c) for i in range(b)]
    for step in range(30):
        e = torch.rand(b, p, c, generator=gen(step), dtype=torch.float64) * (step % 7 + 1)
        e[torch.rand(b, p, c, generator=gen(100 + step)) < 0.3] = math.nan  # not matured
        batched = update(batched, e, levels, cfg)
        looped = [update(s, e[i : i + 1], levels[i], cfg) for i, s in enumerate(looped)]
    for name in ("ratio", "scale", "count"):
        stacked = torch.cat([getattr(s, name) for s in looped])
        torch.testing.assert_close(getattr(batched, name), stacked, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(batched.radius).any()  # every cell saw an error in 30 steps


def test_cell_without_matured_error_has_no_interval_and_keeps_its_state() -> None:
    state = init_state(1, 2, LEVELS, 1)
    state = update(state, torch.tensor([[[1.0], [math.nan]]]), LEVELS)
    assert not torch.isnan(state.radius[0, 0]).any() and torch.isnan(state.radius[0, 1]).all()
    before = state
    state = update(state, torch.full((1, 2, 1), math.nan), LEVELS)
    for name in ("ratio", "scale", "count"):
        torch.testing.assert_close(getattr(state, name), getattr(before, name), equal_nan=True)


def test_matured_errors_arrive_in_delayed_order() -> None:
    t, p, c = 6, 3, 2
    forecasts = torch.randn(t, p, c, generator=gen(0), dtype=torch.float64)
    truths = torch.randn(t, p, c, generator=gen(1), dtype=torch.float64)
    got = matured_errors(forecasts, truths)
    for k in range(t):
        for h in range(1, p + 1):
            want = (
                (forecasts[k - h, h - 1] - truths[k - h, h - 1]).abs()
                if k >= h
                else torch.full((c,), math.nan)
            )
            torch.testing.assert_close(got[k, h - 1], want.double(), equal_nan=True)


@pytest.mark.parametrize("learns", [True, False])
def test_coverage_converges_to_nominal_on_a_stationary_series(learns: bool) -> None:
    """The control does not learn (``lr = 0``): its radius stays the normal guess times the
    running mean |e|, which covers about 91% of these errors at 80%: the check can fail."""
    n, p, c = 3000, 2, 2
    truths = spiky(n, p, c)
    forecasts = torch.zeros(n, p, c, dtype=torch.float64)
    cfg = IntervalConfig() if learns else IntervalConfig(lr=0.0)
    lower, upper = replay(forecasts, truths, LEVELS, cfg)
    cov, width, count = coverage(lower, upper, truths)
    assert count.tolist() == [n * p * c - 3 * c] * 2  # forecasts 0 (both steps) and 1 (step 2)
    off = (cov - LEVELS).abs()
    if learns:
        assert (off < 0.03).all(), cov.tolist()
        assert (width[1] > width[0]).item()
    else:
        assert (off[0] > 0.08).item() and (cov[1] < 0.935).item(), cov.tolist()


def test_coverage_recovers_after_the_errors_grow() -> None:
    n, p, c = 4000, 1, 1
    truths = torch.randn(n, p, c, generator=gen(3), dtype=torch.float64)
    truths[n // 2 :] *= 4.0
    lower, upper = replay(torch.zeros_like(truths), truths, LEVELS)
    cov, _, _ = coverage(lower[n // 2 :], upper[n // 2 :], truths[n // 2 :])
    assert ((cov - LEVELS).abs() < 0.03).all(), cov.tolist()


def test_radii_follow_the_units_of_the_errors() -> None:
    truths = spiky(300, 2, 2, seed=5)
    forecasts = torch.randn(300, 2, 2, generator=gen(9), dtype=torch.float64)
    lower, upper = replay(forecasts, truths, LEVELS)
    lower_k, upper_k = replay(forecasts * 8.0 + 3.0, truths * 8.0 + 3.0, LEVELS)
    torch.testing.assert_close(lower_k, lower * 8.0 + 3.0, equal_nan=True)
    torch.testing.assert_close(upper_k, upper * 8.0 + 3.0, equal_nan=True)
