"""The zero-setup default, as the acceptance suite drives it: `orders-api serve --workers 2` with
no DATABASE_URL in an empty folder runs on an embedded PostgreSQL under ./.data/pg, which
`orders-api dburl` names and a relay started from the same folder joins; SIGTERM leaves no
server behind."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil

from tests.helpers import auth
from tests.live import ORDERS_API, LiveServer, server_env, start_server


def orders_api(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`orders-api …` run from `cwd` with no DATABASE_URL, as a user in that folder would
    (and no broker: a relay prints its events on stdout)."""
    return subprocess.run(
        [ORDERS_API, *args],
        cwd=cwd,
        env=server_env(None, NATS_URL=""),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def servers_on(pgdata: Path) -> list[psutil.Process]:
    """Every live process started on the data folder (the postmaster and its children)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and str(pgdata) in process.cmdline():
                found.append(process)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def test_serve_without_database_url_runs_on_embedded_postgres_and_leaves_none(
    tmp_path: Path,
) -> None:
    # Not under tmp_path: a pytest session starting meanwhile makes its root private again
    # (0700), and the server, which runs as another user when we are root, loses its files.
    folder = Path(tempfile.mkdtemp(prefix="orders-api-e2e-"))
    pgdata = (folder / ".data" / "pg").resolve()
    tenant = f"t-embedded-{uuid.uuid4().hex[:8]}"
    server: LiveServer | None = None
    try:
        server = start_server(None, tmp_path, cwd=folder, timeout=120)
        postmaster = postmaster_pid(pgdata)
        assert not gone(postmaster)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            created = await http.post("/orders", headers=auth(tenant, Idempotency_Key="k1"))
            assert created.status_code == 201, created.text
            order_id = created.json()["id"]
            read = await http.get(f"/orders/{order_id}", headers=auth(tenant))
            assert read.status_code == 200, read.text
            assert read.json()["status"] == "draft"

            # `orders-api dburl` from the same folder names the server the workers write to.
            dburl = orders_api(folder, "dburl")
            assert dburl.returncode == 0, dburl.stderr
            url = dburl.stdout.strip()
            assert url.startswith("postgresql://"), url
            conn = await asyncpg.connect(url)
            try:
                row = await conn.fetchrow(
                    "SELECT tenant_id, status, version FROM orders WHERE id = $1",
                    uuid.UUID(order_id),
                )
                assert row is not None, "dburl names another database than the server's"
                assert tuple(row) == (tenant, "draft", 1)
                assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
                assert await conn.fetchval("SHOW data_directory") == str(pgdata)

                confirm = await http.patch(
                    f"/orders/{order_id}/confirm",
                    json={"totalCents": 4200},
                    headers=auth(tenant, If_Match='"1"'),
                )
                assert confirm.status_code == 200, confirm.text
                close = await http.post(f"/orders/{order_id}/close", headers=auth(tenant))
                assert close.status_code == 200, close.text

                # A relay started from the same folder joins the running server (no broker
                # configured: it prints each event as a JSON line) and leaves it running.
                relay = orders_api(folder, "relay", "--once")
                assert relay.returncode == 0, relay.stderr
                events = [orjson.loads(line) for line in relay.stdout.splitlines()]
                assert [event["orderId"] for event in events] == [order_id], relay.stdout
                assert events[0]["eventType"] == "orders.closed"
                assert events[0]["tenantId"] == tenant
                assert events[0]["payload"]["totalCents"] == 4200
                published = await conn.fetchval(
                    "SELECT published_at FROM outbox WHERE order_id = $1", uuid.UUID(order_id)
                )
                assert published is not None, "the relay marked another database"
            finally:
                await conn.close()
            assert postmaster_pid(pgdata) == postmaster, "the relay started a server of its own"
            assert not gone(postmaster), "the relay stopped the server it had joined"
            still = await http.get(f"/orders/{order_id}", headers=auth(tenant))
            assert still.status_code == 200
            assert still.json()["status"] == "closed"

        assert server.stop() == 0, server.log_tail()
        assert wait_gone(postmaster, 10), "the embedded postmaster outlived `orders-api serve`"
        assert servers_on(pgdata) == [], "a server process on the folder was left running"
        after = orders_api(folder, "dburl")
        assert after.returncode == 2
        assert "no embedded PostgreSQL is running" in after.stderr
    finally:
        if server is not None:
            server.stop(timeout=10)
        for process in servers_on(pgdata):  # a failed run leaks nothing either
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
