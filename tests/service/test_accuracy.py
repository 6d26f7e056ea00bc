"""Live accuracy: the service's scores of its served forecasts equal the online evaluation's
(``trainer.online_eval``, what ``memcast evaluate`` runs) on the same series, per horizon step,
since creation and over the recent window, on either store and through the cross-stream batch."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from models import Feedback, UpdateMode
from models.checkpoint import Checkpoint, load_checkpoint
from service import accuracy
from service.accuracy import Accuracy, Spec, advance, advance_many, recent
from service.settings import Settings
from service.store import StreamRecord
from tests.service.conftest import PRED_LEN, SEQ_LEN, Api, running, series
from trainer.online_eval import metrics, naive_forecasts, replay_stream

T = 5  # forecasts whose whole horizon matures
K = T + PRED_LEN - 1  # forecasts with at least their first step matured
N = SEQ_LEN + T + PRED_LEN - 1  # rows posted


@pytest.fixture(scope="module")
def ckpt(checkpoint_root: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_root / "small")


def evaluated(ckpt: Checkpoint, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served, last-value and true horizons of the first ``K`` forecast origins in the stream's
    units, from the evaluator run on the series extended so every horizon is known."""
    raw = torch.tensor([r["values"] for r in rows], dtype=torch.float64)
    scaled = ckpt.schema.scale(raw).float()
    # streams serve the combination by default: the evaluator replays the same step
    run = replay_stream(
        ckpt.model, scaled, UpdateMode.MEMORY_ONLY, Feedback.DELAYED, max_steps=K, combine=True
    )
    naive = naive_forecasts(scaled, SEQ_LEN, PRED_LEN, ckpt.config.out_indices, K)

    def unscale(a: np.ndarray) -> np.ndarray:
        return ckpt.schema.unscale_targets(torch.from_numpy(a).double()).numpy()

    return unscale(run.forecasts), unscale(naive.forecasts), unscale(run.truths)


def expected(
    ckpt: Checkpoint, rows: list[dict[str, Any]], window: int | None
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Pooled and per-step metrics over the values matured after ``N`` rows (forecast ``k``'s
    step ``h`` matured when ``k + h <= K``), the latest ``window`` of them per step."""
    served, naive, truth = evaluated(ckpt, rows)
    picks = []
    for h in range(1, PRED_LEN + 1):
        count = K - h + 1
        start = 0 if window is None else max(0, count - window)
        picks.append((slice(start, count), h - 1))

    def score(parts: list[tuple[slice, int]]) -> dict[str, float]:
        f = np.concatenate([served[k, h] for k, h in parts])
        n = np.concatenate([naive[k, h] for k, h in parts])
        y = np.concatenate([truth[k, h] for k, h in parts])
        model, last = metrics(f, y), metrics(n, y)
        return {
            "mae": model["mae"],
            "mse": model["mse"],
            "last_value_mae": last["mae"],
            "last_value_mse": last["mse"],
            "skill": 1 - model["mae"] / last["mae"],
            "count": f.size,
        }

    return score(picks), [score([p]) for p in picks]


def assert_matches(body: dict[str, Any], pooled: dict[str, float], steps: list[dict[str, float]]) -> None:
    for got, want in [(body, pooled), *zip(body["steps"], steps, strict=True)]:
        assert got["count"] == want["count"]
        for key in ("mae", "mse", "last_value_mae", "last_value_mse"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
        # a difference of near-equal ratios: the evaluator's float32 truths shift it by ~1e-7
        assert got["skill"] == pytest.approx(want["skill"], abs=1e-6)


async def feed_one_by_one(api: Api, stream_id: str, rows: list[dict[str, Any]]) -> None:
    await api.create(stream_id, rows[:SEQ_LEN])
    for row in rows[SEQ_LEN:N]:
        response = await api.post(stream_id, [row])
        assert response.status_code == 200, response.text


async def test_get_accuracy_equals_online_evaluation(settings: Settings, ckpt: Checkpoint) -> None:
    rows = series(N + PRED_LEN - 1)
    async with running(settings.model_copy(update={"accuracy_window": 3})) as api:
        await feed_one_by_one(api, "s", rows)
        response = await api.client.get("/v1/streams/s/accuracy")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["load_a", "OT"] and body["window"] == 3 and body["steps"] == N
    assert body["pending"] == PRED_LEN  # the last PRED_LEN served forecasts have unmatured steps
    assert_matches(body["since_creation"], *expected(ckpt, rows, None))
    assert_matches(body["recent"], *expected(ckpt, rows, 3))
    assert body["recent"]["steps"][0]["count"] == 3 * 2  # window x target columns


async def test_accuracy_of_streams_batched_together_equals_evaluation(
    settings: Settings, ckpt: Checkpoint
) -> None:
    data = {f"s{i}": series(N + PRED_LEN - 1, scale=0.5 + i / 3) for i in range(4)}
    async with running(settings.model_copy(update={"batch_streams": 8, "workers_threads": 1})) as api:
        await asyncio.gather(*(feed_one_by_one(api, sid, rows) for sid, rows in data.items()))
        text = (await api.client.get("/metrics")).text
        bodies = {sid: (await api.client.get(f"/v1/streams/{sid}/accuracy")).json() for sid in data}
    assert _sample(text, "memcast_batch_streams_count") < 4 * (N - SEQ_LEN)  # some calls were shared
    for sid, rows in data.items():
        assert_matches(bodies[sid]["since_creation"], *expected(ckpt, rows, None))
    # the aggregate histograms: every scored value once, labelled by model and mode only
    scored = 4 * bodies["s0"]["since_creation"]["count"]
    assert _sample(text, 'memcast_forecast_abs_error_count{mode="memory_only",model="small"}') == scored
    assert _sample(text, 'memcast_last_value_abs_error_count{mode="memory_only",model="small"}') == scored
    assert "stream" not in "".join(line for line in text.splitlines() if "abs_error" in line)


async def test_accuracy_ignores_duplicates_and_batched_rows_serve_one_forecast(api: Api) -> None:
    rows = series(SEQ_LEN + 6)
    await api.create("s", rows[:SEQ_LEN])
    assert (await api.post("s", rows[SEQ_LEN : SEQ_LEN + 2])).status_code == 200  # scores step 1, 2
    first = (await api.client.get("/v1/streams/s/accuracy")).json()
    assert [s["count"] for s in first["since_creation"]["steps"]] == [2, 2, 0]
    assert first["pending"] == 2  # the creation's forecast and this request's
    assert (await api.post("s", rows[SEQ_LEN : SEQ_LEN + 2])).json()["duplicates"] == 2
    assert (await api.client.get("/v1/streams/s/accuracy")).json() == first
    # four rows in one request: both pending forecasts mature; only the last one is served
    assert (await api.post("s", rows[SEQ_LEN + 2 :])).status_code == 200
    after = (await api.client.get("/v1/streams/s/accuracy")).json()
    assert [s["count"] for s in after["since_creation"]["steps"]] == [4, 4, 4]
    assert after["pending"] == 1


async def test_reset_stream_clears_accuracy(api: Api) -> None:
    rows = series(SEQ_LEN + 4)
    await api.create("s", rows[:SEQ_LEN])
    for row in rows[SEQ_LEN:]:
        await api.post("s", [row])
    assert (await api.client.get("/v1/streams/s/accuracy")).json()["since_creation"]["count"] > 0
    assert (await api.client.post("/v1/streams/s/reset")).status_code == 200
    body = (await api.client.get("/v1/streams/s/accuracy")).json()
    assert body["since_creation"]["count"] == 0 and body["since_creation"]["mae"] is None
    assert body["pending"] == 0 and len(body["recent"]["steps"]) == PRED_LEN


async def test_get_accuracy_of_missing_stream_is_404(api: Api) -> None:
    response = await api.client.get("/v1/streams/nope/accuracy")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "stream_not_found"


def test_accuracy_round_trips_json_and_bounds_its_size() -> None:
    spec = Spec(targets=(1,), std=(2.0,), pred_len=3, window=4, keep=5)
    acc = Accuracy()
    for s in range(20):
        acc, scored = advance(acc, spec, s, [[0.0, float(s)]], [[s + 1.0], [s + 2.0], [s + 4.0]])
        assert Accuracy.from_json(acc.to_json()) == acc
    assert acc.window is not None and acc.window.filled() == [4, 4, 4]
    assert len(acc.pending) == 3 and len(acc.matured) == 5
    assert scored.errors == [1.0 / 2.0, 0.0, 0.0]  # steps 3, 2, 1 of the pending forecasts, / std
    assert acc.totals[0][0] == 19 and acc.totals[0][1] == 0.0 and acc.totals[2][1] == 17.0


def test_advance_many_equals_advancing_each_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams at every stage (fresh, warming up, steady state with different windows, several
    rows at once, no forecast kept) scored together equal each scored alone, bit for bit, over
    many rounds; the steady-state ones are scored as one batch."""
    spec = Spec(targets=(2, 0), std=(2.0, 0.5), pred_len=4, window=6, keep=7)
    rng = random.Random(3)
    batches: list[int] = []
    batch = accuracy._advance_batch
    monkeypatch.setattr(accuracy, "_advance_batch", lambda *a: batches.append(len(a[-1])) or batch(*a))
    accs, steps = [Accuracy() for _ in range(9)], [0] * 9
    for round_ in range(40):
        rows, forecasts = [], []
        for i in range(9):
            n = 0 if (i == 7 and round_ % 3 == 0) else 3 if (i == 8 and round_ % 4 == 0) else 1
            rows.append([[rng.gauss(0, 3) for _ in range(3)] for _ in range(n)])
            forecasts.append(
                None if i == 6 and round_ % 5 == 0 else [[rng.gauss(0, 3)] * 2 for _ in range(4)]
            )
        if round_ == 0:
            accs[:4] = [advance(Accuracy(), spec, 0, [[1.0, 2.0, 3.0]], [[0.5, 0.5]] * 4)[0]] * 4
            steps[:4] = [1] * 4
        together = advance_many(accs, spec, steps, rows, forecasts)
        for i in range(9):
            alone, scored = advance(accs[i], spec, steps[i], rows[i], forecasts[i])
            acc_many, scored_many = together[i]
            assert orjson.dumps(acc_many.to_json()) == orjson.dumps(alone.to_json()), (round_, i)
            assert scored_many.errors == scored.errors, (round_, i)
            assert scored_many.last_value_errors == scored.last_value_errors, (round_, i)
            assert np.array_equal(
                np.array(scored_many.abs_errors), np.array(scored.abs_errors), equal_nan=True
            ), (round_, i)
            accs[i], steps[i] = acc_many, steps[i] + len(rows[i])
    assert all(len(a.pending or ()) == 4 for a in accs[:6]) and accs[0].window.filled() == [6] * 4  # type: ignore[union-attr]
    assert max(batches) >= 6 and sum(batches) > 200


def test_ring_reads_the_window_of_older_records_and_follows_the_setting() -> None:
    """Records written before the ring kept the window as lists, oldest first; a changed
    ``MEMCAST_ACCURACY_WINDOW`` keeps the latest values."""
    spec = Spec(targets=(0,), std=(1.0,), pred_len=2, window=5, keep=3)
    acc = Accuracy()
    for s in range(12):
        acc, _ = advance(acc, spec, s, [[float(s % 5)]], [[1.0], [2.0]])
    assert acc.window is not None
    lists = [acc.window.oldest_first(h).tolist() for h in range(2)]
    assert acc.pending is not None and acc.matured is not None
    old = {  # the lists records held before the arrays
        "pending": [
            [o, f, last] for o, f, last in zip(*(a.tolist() for a in vars(acc.pending).values()), strict=True)
        ],
        "totals": [list(t) for t in acc.totals.tolist()],  # type: ignore[union-attr]
        "window": lists,
        "matured": [[m.index, m.step, list(m.values)] for m in acc.matured],
    }
    assert recent(Accuracy.from_json(old), 1) == recent(acc, 1)
    read, written = Accuracy.from_json(old).to_json(), acc.to_json()
    assert {**read, "ring": None} == {**written, "ring": None}  # the ring's slots may differ, not its sums
    assert Accuracy.from_json(old).window.oldest_first(1).tolist() == lists[1]  # type: ignore[union-attr]
    smaller, _ = advance(acc, Spec((0,), (1.0,), 2, 3, 3), 12, [], None)
    assert smaller.window is not None and smaller.window.filled() == [3, 3]
    assert smaller.window.oldest_first(0).tolist() == lists[0][-3:]
    # the window's sums are the evaluator's: mean |e| of the latest values per step
    assert recent(acc, 1)[1][0].mae == pytest.approx(sum(e[0] for e in lists[0]) / 5)


def test_record_without_accuracy_field_reads() -> None:
    record = StreamRecord("s", b"x", "small", "f", "memory_only", "1", accuracy={"pending": []})
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in record.to_fields().items()}
    assert StreamRecord.from_fields(fields) == record
    del fields[b"accuracy"]  # a record written before the field existed
    assert StreamRecord.from_fields(fields).accuracy is None


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])
