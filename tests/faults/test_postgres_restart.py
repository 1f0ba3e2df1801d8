"""PostgreSQL restarted under create load: 503 during the outage, recovery without a restart
of the API, and every order answered 2xx exists exactly once afterwards."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from orders_api.app import create_app
from orders_api.errors import Unavailable, database_error
from orders_api.pool import Pool
from tests.faults.load import (
    assert_every_success_exists_once,
    assert_nothing_half_written,
    retry_creates,
    run_load,
    stored_state,
)
from tests.faults.private_postgres import PrivatePostgres
from tests.helpers import make_settings
from tests.live import running_server


def test_postgres_restart_under_load_loses_nothing(
    postgres: PrivatePostgres, tmp_path: Path
) -> None:
    tenant = f"t-restart-{uuid.uuid4().hex[:8]}"
    readiness: dict[str, list[int]] = {"down": [], "up": []}
    outage: dict[str, float] = {}
    with running_server(postgres.url(), tmp_path) as server:
        serve_pid = server.process.pid

        async def restart_postgres() -> None:
            await asyncio.sleep(2.5)
            outage["start"] = time.monotonic()
            await asyncio.to_thread(postgres.stop, "fast")
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as probe:
                for _ in range(4):
                    readiness["down"].append((await probe.get("/readyz")).status_code)
                    await asyncio.sleep(0.5)
                outage["end"] = time.monotonic()
                await asyncio.to_thread(postgres.start)
                for _ in range(40):
                    status = (await probe.get("/readyz")).status_code
                    readiness["up"].append(status)
                    if status == 200:
                        break
                    await asyncio.sleep(0.25)

        log = asyncio.run(run_load(server.base_url, tenant, 9, during=restart_postgres))
        failed = sorted(
            {a.key for a in log.answers if a.status not in (200, 201)}
            - {a.key for a in log.ok("create")}
        )
        asyncio.run(retry_creates(server.base_url, tenant, log, failed))
        assert server.process.poll() is None
        assert server.process.pid == serve_pid
        server_log = server.log_tail()
    stored = asyncio.run(stored_state(postgres.url(), tenant))

    statuses = log.by_status("create")
    context = f"{statuses}\n{server_log}"
    # During the outage: 503 unavailable with the error shape, never a 500 or a hang.
    assert set(statuses) <= {200, 201, 503}, context
    assert statuses.get(503, 0) > 0, f"the outage was not seen: {context}"
    unavailable = [a for a in log.answers if a.status == 503]
    assert all(a.body.get("code") == "unavailable" for a in unavailable), unavailable[:3]
    assert all(set(a.body) <= {"code", "message", "details"} for a in unavailable)
    assert max(a.seconds for a in log.answers) < 10, "a request hung"
    # /readyz said so, and recovered by itself.
    assert readiness["down"], readiness
    assert set(readiness["down"]) == {503}, readiness
    assert readiness["up"][-1] == 200, readiness
    # Under load again after PostgreSQL came back, on the same server process: new orders.
    after = [a for a in log.answers if a.status == 201 and a.at > outage["end"]]
    assert len(after) > 0, context
    # Nothing lost, nothing doubled: every key ends with exactly one order.
    keys = {a.key for a in log.answers}
    assert {a.key for a in log.ok("create")} == keys
    assert set(stored.keys) == keys
    assert len(stored.orders) == len(keys)
    assert_every_success_exists_once(log, stored)
    assert_nothing_half_written(stored)
    summary = {"creates": statuses, "orders": len(stored.orders), "readyz": readiness}
    (tmp_path / "summary.json").write_text(json.dumps(summary, default=str))


async def test_a_statement_past_the_timeout_is_cancelled_and_unavailable(
    postgres: PrivatePostgres,
) -> None:
    settings = make_settings(postgres.url(), db_statement_timeout_ms=300)
    pool = Pool.from_settings("timeout-test", settings, max_size=1)
    try:
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError) as raised:
            await pool.fetchval("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 2
        error = database_error(raised.value)
        assert isinstance(error, Unavailable)
        assert "timed out" in error.message
        in_use = {"pool": "timeout-test", "state": "in_use"}
        assert REGISTRY.get_sample_value("orders_api_db_pool_connections", in_use) == 0
        # The one connection came back and still works: the server cancelled only the statement.
        async with asyncio.timeout(2):
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 200
