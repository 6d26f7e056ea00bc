"""The compose topology without Docker, on loopback: redis-server with docker/redis.conf, the
pretrain job's command, two `memcast serve` processes sharing that Redis, and a Redis restart
that the streams' state survives through the append-only file."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import pytest

from memcast.harness import RedisServer
from models.checkpoint import is_checkpoint
from tests.deploy import _deploy as d
from tests.deploy.conftest import Api, clean_env

pytestmark = pytest.mark.slow

# Appended to the compose job's own command line (argparse: the last value of a flag wins).
TINY = "--seq-len 8 --pred-len 4 --d-model 8 --n-layers 1 --n-heads 2 --epochs 1 --batch-size 16 --max-train-windows 32"
STREAM = "deploy-test"


def _host_paths(argv: list[str], mapping: dict[str, Path]) -> list[str]:
    """Container paths (the compose mount targets) -> the test's directories."""
    out = []
    for arg in argv:
        for target, host in mapping.items():
            if arg == target or arg.startswith(target.rstrip("/") + "/"):
                arg = str(host) + arg[len(target.rstrip("/")) :]
                break
        out.append(arg)
    return out


def _memcast(*argv: str, tmp: Path) -> None:
    result = subprocess.run(
        [str(d.BIN / "memcast"), *argv], env=clean_env(), capture_output=True, text=True, timeout=150, cwd=tmp
    )
    assert result.returncode == 0, f"memcast {' '.join(argv)}:\n{result.stdout}\n{result.stderr}"


def _rows(csv_path: Path, columns: list[str], start: int, count: int) -> list[dict[str, Any]]:
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))[start : start + count]
    return [{"timestamp": start + i, "values": {c: float(r[c]) for c in columns}} for i, r in enumerate(rows)]


def _ok(response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()


def _snapshot(api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
    return _ok(api.http.get(f"/v1/streams/{STREAM}")), _ok(api.http.get(f"/v1/streams/{STREAM}/forecast"))


def test_two_apis_share_a_stream_that_survives_a_redis_restart(tmp_path: Path, configured_redis: RedisServer):
    services = d.interpolate(d.load_compose())["services"]
    api_env = {k: v for k, v in d.environment(services["api"]).items() if v is not None}
    data_dir, ckpt_dir = tmp_path / "data", tmp_path / "checkpoints"
    mapping = {"/data": data_dir, api_env["MEMCAST_CHECKPOINT_DIR"]: ckpt_dir}

    # --- the pretraining job: a tiny generated CSV, then the compose service's own command
    _memcast(
        "make-data", "--out", str(data_dir / "train.csv"), "--rows", "300", "--channels", "3", tmp=tmp_path
    )
    job = _host_paths(d.as_argv(services["pretrain"]["command"]), mapping)
    _memcast(*job, *TINY.split(), tmp=tmp_path)
    written = [p for p in ckpt_dir.iterdir() if is_checkpoint(p)]
    assert [p.name for p in written] == ["default"]

    # --- Redis from docker/redis.conf, two API replicas configured like the compose api service
    configured_redis.start()
    env = clean_env(
        **{**api_env, "MEMCAST_REDIS_URL": configured_redis.url, "MEMCAST_CHECKPOINT_DIR": str(ckpt_dir)}
    )
    command = d.as_argv(services["api"]["command"])
    apis = [Api(name, command, env, tmp_path / f"api-{name}.log") for name in "ab"]
    a, b = apis
    try:
        for api in apis:
            api.spawn()
        for api in apis:
            api.wait_ready()
        assert [a.probe("/healthz"), a.probe("/readyz"), b.probe("/readyz")] == [0, 0, 0]

        # --- write through one replica, read through the other
        model = _ok(a.http.get("/v1/models"))["models"][0]
        columns, seq_len = model["columns"], model["seq_len"]
        history = _rows(data_dir / "train.csv", columns, 0, seq_len)
        _ok(a.http.post("/v1/streams", json={"id": STREAM, "history": history}), 201)
        posted = _ok(
            a.http.post(
                f"/v1/streams/{STREAM}/observations",
                json={"observations": _rows(data_dir / "train.csv", columns, seq_len, 5)},
            )
        )
        assert posted["applied"] == 5 and posted["steps"] == seq_len + 5 and posted["forecast"] is not None

        stream_a, forecast_a = _snapshot(a)
        stream_b, forecast_b = _snapshot(b)
        assert stream_b == stream_a and stream_b["steps"] == seq_len + 5
        assert forecast_b == forecast_a and forecast_b["forecast"] == posted["forecast"]
        with configured_redis.client() as r:
            keys = sorted(r.keys("*"))
        assert len(keys) == 1 and STREAM.encode() in keys[0]

        # --- Redis stops (SIGTERM, as `docker compose stop` does): the APIs report not ready
        assert configured_redis.stop() == 0
        assert (configured_redis.directory / "appendonlydir").is_dir()
        assert not (configured_redis.directory / "dump.rdb").exists(), "only the AOF may bring the state back"
        assert a.http.get("/readyz").status_code == 503
        assert [a.probe("/healthz"), a.probe("/readyz")] == [0, 1]  # compose would mark api unhealthy
        assert a.http.get(f"/v1/streams/{STREAM}").status_code == 503

        # --- Redis comes back on the same directory: the state is there, for both replicas
        configured_redis.start()
        for api in apis:
            api.wait_ready(timeout=30)
        with configured_redis.client() as r:
            assert sorted(r.keys("*")) == keys
        assert _snapshot(a) == (stream_a, forecast_a)
        assert _snapshot(b) == (stream_a, forecast_a)

        # --- and the replicas keep learning from it together
        more = _rows(data_dir / "train.csv", columns, seq_len + 5, 1)
        _ok(b.http.post(f"/v1/streams/{STREAM}/observations", json={"observations": more}))
        after, _ = _snapshot(a)
        assert after["steps"] == stream_a["steps"] + 1 and after["version"] > stream_a["version"]
    finally:
        for api in apis:
            api.stop()
