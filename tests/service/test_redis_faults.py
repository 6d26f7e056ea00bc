"""Fault injection under load: Redis (or one master of a Redis Cluster) killed (SIGKILL) and
restarted, and Redis made slow, silent or cut off by a TCP proxy on loopback.

Whatever happens, every request answers 200 or 503 (never 500), none waits much past the store
timeout, and no acknowledged observation is lost or learned twice: clients retry a 503 with the
same observation, and each stream ends with exactly the observations its client posted.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from memcast.harness import RedisCluster
from service.settings import Settings
from tests.conftest import RedisServer
from tests.service.conftest import SEQ_LEN, Api, running, series
from tests.service.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

TIMEOUT_S = 0.5
# one store call: a timeout, one reconnect and a second timeout; a request makes at most a
# read and a write, plus the model's time
HANG_BOUND_S = 4 * TIMEOUT_S + 1.5


class Client:
    """One producer of one stream: posts observations in order, retrying each on 503."""

    def __init__(self, api: Api, stream_id: str) -> None:
        self.api, self.stream_id = api, stream_id
        self.statuses: Counter[int] = Counter()
        self.acks: list[str] = []  # "applied" or "duplicate", one per observation
        self.slowest = 0.0

    async def run(self, rows: list[dict], stop: asyncio.Event | None = None) -> None:
        for row in rows:
            while True:
                start = time.monotonic()
                response = await self.api.post(self.stream_id, [row])
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    self.acks.append(response.json()["observations"][0]["status"])
                    break
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                await asyncio.sleep(0.05)
            if stop is not None and stop.is_set():
                return


async def test_post_observations_redis_killed_under_load_loses_nothing(
    own_redis: RedisServer, checkpoint_root: Path
) -> None:
    settings = Settings(
        checkpoint_dir=checkpoint_root, redis_url=own_redis.url, torch_threads=None, store_timeout_s=TIMEOUT_S
    )
    streams, per_stream = 4, 40
    async with running(settings) as api:
        for i in range(streams):
            await api.create(f"s{i}", series(SEQ_LEN))
        clients = [Client(api, f"s{i}") for i in range(streams)]

        async def chaos() -> None:
            for _ in range(2):
                while sum(len(c.acks) for c in clients) < 10:  # under load
                    await asyncio.sleep(0.01)
                assert own_redis.process is not None
                own_redis.process.kill()  # SIGKILL: no shutdown, no final fsync
                own_redis.process.wait()
                own_redis.process = None
                await asyncio.sleep(0.5)
                await asyncio.to_thread(own_redis.start)  # same port, same append-only file
                await asyncio.sleep(0.3)

        await asyncio.gather(chaos(), *(c.run(series(per_stream, start=SEQ_LEN)) for c in clients))
        assert sum(c.statuses[503] for c in clients) > 0  # the faults did hit requests
        for client in clients:
            assert set(client.statuses) <= {200, 503} and len(client.acks) == per_stream
            assert client.slowest < HANG_BOUND_S, client.slowest
            body = (await api.client.get(f"/v1/streams/{client.stream_id}")).json()
            assert body["steps"] == SEQ_LEN + per_stream  # nothing lost, nothing learned twice
            assert body["last_timestamp"] == SEQ_LEN + per_stream - 1


async def test_post_observations_cluster_master_killed_under_load_loses_nothing(
    tmp_path: Path, checkpoint_root: Path
) -> None:
    """One master of three killed and restarted: its streams answer 503 meanwhile, the others
    are still served (redis-py's cluster client re-reads the slot map after a connection error,
    so a few of their requests may answer 503 too), and every stream ends with exactly its
    client's observations."""
    with RedisCluster(tmp_path, persistent=True) as cluster:
        settings = Settings(
            checkpoint_dir=checkpoint_root,
            redis_url=cluster.url,
            torch_threads=None,
            store_timeout_s=TIMEOUT_S,
        )
        streams, per_stream = 6, 30
        async with running(settings) as api:
            for i in range(streams):
                await api.create(f"s{i}", series(SEQ_LEN))
            victim = cluster.owner("memcast:{s0}")
            on_victim = {f"s{i}" for i in range(streams) if cluster.owner(f"memcast:{{s{i}}}") is victim}
            assert len(on_victim) < streams, "pick stream ids that land on more than one master"
            clients = [Client(api, f"s{i}") for i in range(streams)]

            others = [c for c in clients if c.stream_id not in on_victim]
            served_while_down = 0

            async def chaos() -> None:
                nonlocal served_while_down
                while sum(len(c.acks) for c in clients) < 20:  # under load
                    await asyncio.sleep(0.01)
                victim.kill()  # SIGKILL: no shutdown, no final fsync
                before = sum(len(c.acks) for c in others)
                await asyncio.sleep(1.0)
                served_while_down = sum(len(c.acks) for c in others) - before
                await asyncio.to_thread(victim.start)  # same port, nodes.conf and append-only file

            await asyncio.gather(chaos(), *(c.run(series(per_stream, start=SEQ_LEN)) for c in clients))
            assert all(c.statuses[503] for c in clients if c.stream_id in on_victim)
            assert served_while_down > 0  # the other masters' streams went on
            for client in clients:
                assert set(client.statuses) <= {200, 503} and len(client.acks) == per_stream
                assert client.slowest < HANG_BOUND_S, client.slowest
                body = (await api.client.get(f"/v1/streams/{client.stream_id}")).json()
                assert body["steps"] == SEQ_LEN + per_stream  # nothing lost, nothing learned twice


@pytest.mark.parametrize("fault", ["slow", "silent", "cut"])
async def test_post_observations_redis_slow_silent_or_cut_503_never_500(
    redis_url: str, checkpoint_root: Path, fault: str
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(port) as proxy:
        settings = Settings(
            checkpoint_dir=checkpoint_root, redis_url=proxy.url, torch_threads=None, store_timeout_s=TIMEOUT_S
        )
        async with running(settings) as api:
            await api.create("s1", series(SEQ_LEN))
            client = Client(api, "s1")
            rows = series(30, start=SEQ_LEN)
            await client.run(rows[:5])
            assert client.statuses == Counter({200: 5})

            proxy.delay_s = 0.1  # slower than usual, faster than the timeout: still served
            await client.run(rows[5:7])
            assert client.statuses[503] == 0

            async def inject() -> None:
                await asyncio.sleep(0.2)
                if fault == "slow":
                    proxy.delay_s = 3 * TIMEOUT_S
                elif fault == "silent":
                    proxy.delay_s, proxy.blackhole = 0.0, True
                for _ in range(5 if fault == "cut" else 1):
                    if fault == "cut":
                        proxy.delay_s = 0.0
                        proxy.cut()
                    await asyncio.sleep(0.4 if fault == "cut" else 2.0)
                proxy.delay_s, proxy.blackhole = 0.0, False

            await asyncio.gather(inject(), client.run(rows[7:]))
            assert set(client.statuses) <= {200, 503} and len(client.acks) == len(rows)
            assert client.slowest < HANG_BOUND_S, client.slowest
            if fault != "cut":  # a cut connection is usually re-made within the same call
                assert client.statuses[503] > 0
            body = (await api.client.get("/v1/streams/s1")).json()
            assert body["steps"] == SEQ_LEN + len(rows) and body["last_timestamp"] == SEQ_LEN + len(rows) - 1
