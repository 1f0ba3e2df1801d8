"""A worker killed with SIGKILL under load leaves no half-written order: every order has the
idempotency record that answered it, every closed order its one outbox row; uvicorn starts a
new worker and the server keeps answering."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx

from tests.faults.load import (
    assert_every_success_exists_once,
    assert_nothing_half_written,
    retry_creates,
    run_load,
    stored_state,
)
from tests.faults.private_postgres import PrivatePostgres
from tests.live import LiveServer, running_server

KILLS = 3


def wait_for_workers(
    server: LiveServer, count: int, exclude: set[int], timeout: float = 20
) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in server.worker_pids() if pid not in exclude]
        if len(pids) >= count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"workers not back: {server.worker_pids()}\n{server.log_tail()}")


def test_sigkilled_workers_leave_no_half_written_order(
    postgres: PrivatePostgres, tmp_path: Path
) -> None:
    database_url = postgres.url()
    tenant = f"t-kill-{uuid.uuid4().hex[:8]}"
    killed: list[int] = []
    with running_server(database_url, tmp_path) as server:
        first = wait_for_workers(server, 2, set())

        async def kill_workers() -> None:
            for _ in range(KILLS):
                await asyncio.sleep(1.5)
                victim = next(pid for pid in server.worker_pids() if pid not in killed)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        log = asyncio.run(run_load(server.base_url, tenant, 7, lifecycle=True, during=kill_workers))
        replacements = wait_for_workers(server, 2, set(killed))
        unanswered = sorted(
            {a.key for a in log.answers if a.step == "create"} - {a.key for a in log.ok("create")}
        )
        asyncio.run(retry_creates(server.base_url, tenant, log, unanswered))
        with httpx.Client(base_url=server.base_url) as http:
            assert http.get("/healthz").status_code == 200
        assert server.process.poll() is None
        server_log = server.log_tail()
    stored = asyncio.run(stored_state(database_url, tenant))

    assert len(killed) == KILLS
    assert set(first) & set(killed), "the workers that served were the ones killed"
    assert not set(replacements) & set(killed)
    context = f"{log.by_status('create')} {log.by_status('confirm')} {log.by_status('close')}"
    context += f"\n{server_log}"
    # The kills cut some requests off (no answer at all) but none was answered 5xx.
    dropped = [a for a in log.answers if a.status is None]
    assert all(a.status is None or a.status < 500 for a in log.answers), context
    assert len(log.ok("close")) > 0, context
    # Nothing half-written, whatever was cut off mid-transaction.
    assert_nothing_half_written(stored)
    # Every 2xx exists exactly once; every key retried ends with exactly one order.
    assert_every_success_exists_once(log, stored)
    assert {a.key for a in log.ok("create")} == {a.key for a in log.answers}
    assert len(stored.orders) == len({a.key for a in log.answers})
    summary = {
        "kills": len(killed),
        "dropped": len(dropped),
        "creates": log.by_status("create"),
        "confirms": log.by_status("confirm"),
        "closes": log.by_status("close"),
        "orders": len(stored.orders),
        "closed": len(stored.closed_events),
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary, default=str))
