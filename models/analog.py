"""Per-stream analog forecast: what followed the stream's own most similar past windows, mixed
into the memory_only forecast with a weight learned from matured errors.

Why: under recurring regimes (``memcast make-data --regimes 3``) the linear output corrector
(``models/corrector.py``) learns too slowly to follow segments of 100-400 rows, and it is not
a matter of unlearning: one corrector per true regime gains under 1% (-8.9% against -8.5%
under the frozen checkpoint), and no faster linear learner tried passed -9.7%
(docs/investigations.md). What a stream has already seen helps: the windows of its past most
like the current one (same regime, same time of day) and what followed them. Their mean
continuation, added to the current last value, is a forecast whose errors are little
correlated with the corrected forecast's, so a share of it lowers the error (generated regimes
48 -> 12, delayed feedback: -15.4% under the frozen checkpoint with it, -8.5% without; every
ETTh1 row gains too).

Axes: ``b`` streams, ``r`` archive rows (oldest first), ``c`` output channels, ``p`` horizon
step, ``m`` candidate windows, ``k`` neighbours.

The analog forecast of a window ``x [n, c]`` (``n >= KEY_LEN``): its key is its last
``KEY_LEN`` rows; candidates are the archive's windows of ``KEY_LEN`` rows whose following
``p`` rows had been observed when the forecast was made (never a value after the window); the
``NEIGHBOURS`` candidates nearest in squared distance give

    a = x[-1] + mean_k (archive[e_k + 1 .. e_k + p] - archive[e_k])

with ``e_k`` the last row of neighbour ``k``. A stream with fewer candidates has no analog
forecast yet (the mix leaves its forecast unchanged).

The mix: ``forecast + beta_p (a - forecast)``, with ``beta_p`` per horizon step the ridge
least-squares weight of the matured pairs' analog-forecast gap, in window standard deviations
``s`` (the corrector's normalised units):

    num_p <- FORGET num_p + sum_c d_pc r_pc,   den_p <- FORGET den_p + sum_c d_pc^2,
    beta_p = clamp(num_p / (den_p + RIDGE), 0, 1)

with ``d = (a - forecast) / s`` and ``r = clamp((y - forecast) / s, +-ERROR_CLIP)``; the ridge
keeps ``beta`` at 0 (the forecaster's own forecast) until the evidence outweighs it, which
protects the data sets where the analog helps little (ETTh1-S: beta 0.0-0.2 in the replay).

State (``TensorDict`` with leading stream dimension, under the stream state's ``"analog"``):
``archive [b, c, r]`` (the last ``r = analog_rows`` observed values, channels first),
``filled [b]`` (rows written, at most ``r``), ``num [b, p]`` and ``den [b, p]``, and the
forecasts of the last ``p`` observations until their pairs mature (oldest first): the analog
ones ``pending [b, j=p, p, c]`` with ``pending_has [b, j]``, and the ones they were mixed into,
``pending_base [b, j, p, c]``: a matured pair learns from what was served, without searching
the archive again.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor

from models.base import as_dtype, replaced
from models.corrector import EPS, ERROR_CLIP

KEY_LEN = 24  # rows compared: a day of hourly values (at most the window)
NEIGHBOURS = 20  # windows averaged (fewer: noisier; more: blurs regimes, measured 10 / 20 / 30)
RIDGE = 100.0  # prior weight of beta = 0, in squared normalised units
FORGET = 0.999  # evidence kept per matured pair (a memory of ~1,000 pairs: drifts are followed)


def init_state(
    batch: int,
    rows: int,
    pred_len: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TensorDict:
    """An empty archive and no evidence yet (beta 0)."""
    leaves = {
        "archive": torch.zeros(batch, channels, rows, dtype=dtype, device=device),
        "filled": torch.zeros(batch, dtype=torch.int64, device=device),
        "num": torch.zeros(batch, pred_len, dtype=dtype, device=device),
        "den": torch.zeros(batch, pred_len, dtype=dtype, device=device),
        "pending": torch.zeros(batch, pred_len, pred_len, channels, dtype=dtype, device=device),
        "pending_base": torch.zeros(batch, pred_len, pred_len, channels, dtype=dtype, device=device),
        "pending_has": torch.zeros(batch, pred_len, dtype=torch.bool, device=device),
    }
    return TensorDict(leaves, batch_size=[batch], device=device)


def observe(
    state: TensorDict, values: Tensor, window: Tensor, base: Tensor, pred_len: int
) -> tuple[TensorDict, Tensor, Tensor]:
    """One observation of a stream: :func:`append` ``values [b, c]``, make the analog forecast of
    ``window [b, n, c]`` (which ends with them) and :func:`push` it with ``base [b, p, c]``, the
    forecast it is mixed into; returns the state, the analog forecast and which streams have one
    (one state write for the three: they run at every observation)."""
    grown = append(state, values)
    found, has = forecast(grown, window, pred_len)
    return push(grown, base, found, has), found, has


def push(state: TensorDict, base: Tensor, analog: Tensor, has: Tensor) -> TensorDict:
    """Keep the forecast ``base [b, p, c]`` just mixed with the analog forecast ``analog``
    (``has [b]``: whether there is one) until their pair matures, ``pred_len`` observations
    later (the oldest ones drop out)."""
    changed = {
        key: torch.cat([old[:, 1:], as_dtype(new, old.dtype)[:, None]], dim=1)
        for key, new, old in (
            ("pending_base", base, state["pending_base"]),
            ("pending", analog, state["pending"]),
            ("pending_has", has, state["pending_has"]),
        )
    }
    return replaced(state, changed)  # (not clone and set: this runs at every observation)


def matured(state: TensorDict) -> tuple[Tensor, Tensor, Tensor]:
    """What :func:`push` kept ``pred_len`` observations ago, for the pair that matures now:
    the base forecast, the analog forecast and whether there was one."""
    return state["pending_base"][:, 0], state["pending"][:, 0], state["pending_has"][:, 0]


def append(state: TensorDict, values: Tensor) -> TensorDict:
    """The archive after observing ``values [b, c]`` (the oldest row drops out)."""
    archive = state["archive"]
    return replaced(
        state,
        {
            "archive": torch.cat([archive[:, :, 1:], as_dtype(values, archive.dtype)[:, :, None]], dim=2),
            "filled": (state["filled"] + 1).clamp(max=archive.shape[2]),
        },
    )


def forecast(state: TensorDict, window: Tensor, pred_len: int) -> tuple[Tensor, Tensor]:
    """The analog forecast ``[b, p, c]`` of ``window [b, n, c]``, the stream's newest window
    (it ends at the archive's newest row), and which streams have one ``[b]``."""
    archive = state["archive"]  # [b, c, r], channels first: rows are contiguous per channel
    b, c, rows = archive.shape
    key_len = min(KEY_LEN, window.shape[1])
    k = NEIGHBOURS
    # candidates: windows of key_len rows whose next pred_len rows are observed, all written
    needed = key_len + pred_len + k - 1  # rows written for at least k of them
    has = state["filled"] >= needed  # [b]
    fewest, most = (int(n) for n in torch.aminmax(state["filled"]))  # (one reduction, three checks)
    if most < needed:
        return window.new_zeros(b, pred_len, c), has
    key = as_dtype(window[:, -key_len:], archive.dtype)  # [b, key_len, c]
    if c > 1:  # (one channel: one product per entry, rounded alike whatever the layout)
        key = key.transpose(1, 2).contiguous().transpose(1, 2)
    past = archive[:, :, : rows - pred_len]  # candidate m covers rows m .. m + key_len - 1
    # |w_m - key|^2 = |w_m|^2 - 2 w_m . key + |key|^2 ranks as |w_m|^2 - 2 w_m . key; both sums
    # over a window are sums along diagonals: of the rows' energies, and of the products of
    # every key row with every archive row (one batched matrix product, no copy per window)
    count, length = past.shape[2] - key_len + 1, past.shape[2]
    rows_sq = past * past
    rows_sq = rows_sq[:, 0] if c == 1 else rows_sq.sum(dim=1)  # [b, r - p] (one channel: no sum)
    energy = rows_sq.as_strided((b, key_len, count), (length, 1, 1)).sum(dim=1)  # [b, m]
    products = torch.bmm(key, past)  # [b, key_len, r - p]: key row i . archive row j
    dot = products.as_strided((b, key_len, count), (key_len * length, length + 1, 1)).sum(dim=1)  # [b, m]
    distance = energy.sub(dot, alpha=2.0)
    if fewest < rows:  # rows not written yet are no candidates
        first = rows - state["filled"]  # [b] oldest row written
        unwritten = torch.arange(distance.shape[1], device=archive.device)[None] < first[:, None]
        distance = distance.masked_fill(unwritten, float("inf"))
    nearest = distance.topk(k, dim=1, largest=False).indices  # [b, k]
    # each neighbour's rows from its last one to the end of its future, [b, k, p + 1]
    ahead = torch.arange(key_len - 1, key_len + pred_len, device=archive.device)
    steps = nearest[..., None] + ahead
    paths = torch.gather(archive, 2, steps.reshape(b, 1, -1).expand(-1, c, -1)).view(b, c, k, pred_len + 1)
    continuation = (paths[..., 1:] - paths[..., :1]).mean(dim=2).transpose(1, 2)  # [b, p, c]
    analog = as_dtype(window[:, -1:], archive.dtype) + continuation
    if fewest < needed:
        analog = torch.where(has[:, None, None], analog, torch.zeros_like(analog))
    return analog, has


def beta(state: TensorDict) -> Tensor:
    """Each stream's weight of the analog forecast per horizon step ``[b, p]``."""
    return (state["num"] / (state["den"] + RIDGE)).clamp(0.0, 1.0)


def mix(state: TensorDict, forecast_: Tensor, analog: Tensor, has: Tensor) -> Tensor:
    """``forecast_ [b, p, c]`` moved toward the analog forecast by each stream's beta (unchanged
    for a stream without an analog forecast)."""
    weight = as_dtype(beta(state), forecast_.dtype)[..., None]  # [b, p, 1]
    if not bool(has.all()):
        weight = weight * has[:, None, None].to(weight.dtype)
    return forecast_ + weight * (as_dtype(analog, forecast_.dtype) - forecast_)


def update(
    state: TensorDict,
    window: Tensor,
    forecast_: Tensor,
    analog: Tensor,
    has: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
) -> TensorDict:
    """Add a matured pair's evidence: ``forecast_`` (the forecast the mix was applied to) and
    ``analog`` of ``window [b, n, c]``, observed ``target [b, p, c]``. Streams without an analog
    forecast (``has`` false) or masked out are unchanged."""
    num, den = state["num"], state["den"]
    dtype = num.dtype
    std = (as_dtype(window, dtype).var(dim=1, keepdim=True, correction=0) + EPS).sqrt()  # [b, 1, c]
    base = as_dtype(forecast_, dtype)
    gap = (as_dtype(analog, dtype) - base) / std  # [b, p, c]
    residual = ((as_dtype(target, dtype) - base) / std).clamp(-ERROR_CLIP, ERROR_CLIP)
    learns = has if mask is None else has & mask
    new_num = FORGET * num + (gap * residual).sum(dim=-1)
    new_den = FORGET * den + (gap * gap).sum(dim=-1)
    if not bool(learns.all()):
        new_num = torch.where(learns[:, None], new_num, num)
        new_den = torch.where(learns[:, None], new_den, den)
    return replaced(state, {"num": new_num, "den": new_den})
