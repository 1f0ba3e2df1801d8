"""Starts the topology without the API and proves each part under its fault; prints JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from chaos import procs
from chaos.topology import Topology

BASE_DIR = Path(os.environ.get("CHAOS_BASE_DIR", "/tmp/orders-chaos-smoke"))
STREAM = "CHAOS_SMOKE"
SUBJECT = "chaos.smoke"


# -- PostgreSQL: multi-host DSN across a SIGKILLed primary ------------------------------


async def _pg_write(dsn: str, note: str) -> int:
    """Insert one row through dsn; the port of the server that took it."""
    conn = await asyncpg.connect(dsn, timeout=2)
    try:
        await conn.execute("create table if not exists chaos_smoke (id serial, note text)")
        await conn.execute("insert into chaos_smoke (note) values ($1)", note)
        return int(await conn.fetchval("select inet_server_port()"))
    finally:
        await conn.close()


async def _pg_notes(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=2)
    try:
        return [r["note"] for r in await conn.fetch("select note from chaos_smoke order by id")]
    finally:
        await conn.close()


async def _pg_write_until_ok(dsn: str, note: str, within: float) -> tuple[int, int]:
    """Retry a write through the multi-host DSN until one commits; (port, attempts)."""
    deadline = time.monotonic() + within
    attempts = 0
    while True:
        attempts += 1
        try:
            return await _pg_write(dsn, note), attempts
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _pg_sync_state(dsn: str) -> dict[str, Any]:
    """synchronous_standby_names and each standby's sync_state, on the primary."""
    conn = await asyncpg.connect(dsn, timeout=2)
    try:
        names = await conn.fetchval("show synchronous_standby_names")
        rows = await conn.fetch("select application_name, sync_state from pg_stat_replication")
        return {"synchronous_standby_names": names, **{r[0]: r[1] for r in rows}}
    finally:
        await conn.close()


def _failover_round(topo: Topology, note: str) -> dict[str, Any]:
    """Write, SIGKILL the primary, write again through the same DSN, restart the old one."""
    pg = topo.pg
    sync = asyncio.run(_pg_sync_state(pg.dsn))
    before_port = asyncio.run(_pg_write(pg.dsn, f"{note}-before"))
    old = pg.kill_primary()
    after_port, attempts = asyncio.run(_pg_write_until_ok(pg.dsn, f"{note}-after", 60))
    client_gap = time.monotonic() - (pg.killed_at or 0)
    failover = pg.wait_for_new_primary(old, 60)
    new = pg.primary()
    pg.restart_node(old)
    heal = pg.wait_healthy(90)
    return {
        "killed": old,
        "new_primary": new,
        "moved": before_port != after_port,
        "sync_before_kill": sync,
        "failover_s": round(failover, 2),
        "client_write_gap_s": round(client_gap, 2),
        "client_attempts": attempts,
        "heal_s": round(heal, 2),
    }


def check_postgres(topo: Topology, rounds: int = 2) -> dict[str, Any]:
    """`rounds` failovers (there and back); every row on the primary and the healed standby."""
    pg = topo.pg
    results = [_failover_round(topo, f"r{i}") for i in range(1, rounds + 1)]
    expected = [f"r{i}-{when}" for i in range(1, rounds + 1) for when in ("before", "after")]
    notes_primary = asyncio.run(_pg_notes(pg.dsn))
    standby = next(name for name, (state, _) in pg.states().items() if state == "secondary")
    notes_standby = asyncio.run(_pg_notes(pg.node_dsn(standby)))
    return {
        "ok": notes_primary == expected == notes_standby and all(r["moved"] for r in results),
        "failover_s": [r["failover_s"] for r in results],
        "client_write_gap_s": [r["client_write_gap_s"] for r in results],
        "heal_s": [r["heal_s"] for r in results],
        "rounds": results,
        "rows_on_primary": notes_primary,
        "rows_on_standby": notes_standby,
        "monitor_gucs": pg.gucs,
        "states": pg.states(),
    }


# -- PgBouncer: transaction pooling with unnamed statements ---------------------------


async def _bouncer_load(dsn: str, clients: int, rounds: int) -> int:
    """`clients` connections with statement_cache_size=0, each `rounds` write+read txns."""

    async def client(i: int) -> int:
        conn = await asyncpg.connect(
            dsn,
            timeout=5,
            statement_cache_size=0,
            server_settings={"application_name": "chaos-smoke"},
        )
        try:
            done = 0
            for r in range(rounds):
                async with conn.transaction():
                    await conn.execute(
                        "insert into chaos_bouncer (client, round) values ($1, $2)", i, r
                    )
                    n = await conn.fetchval(
                        "select count(*) from chaos_bouncer where client = $1", i
                    )
                done += n == r + 1
            return done
        finally:
            await conn.close()

    setup = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
    try:
        await setup.execute("create table if not exists chaos_bouncer (client int, round int)")
        await setup.execute("truncate chaos_bouncer")
    finally:
        await setup.close()
    return sum(await asyncio.gather(*(client(i) for i in range(clients))))


async def _bouncer_rejects(dsn: str, setting: str) -> str:
    """The error PgBouncer gives a client sending `setting` at startup ('' if none)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5, server_settings={setting: "5000"})
    except (asyncpg.PostgresError, OSError) as exc:
        return str(exc)
    await conn.close()
    return ""


def check_pgbouncer(topo: Topology, clients: int = 10, rounds: int = 20) -> dict[str, Any]:
    """Concurrent write+read transactions through PgBouncer; what it does with timeouts."""
    dsn = topo.pgbouncer.dsn()
    started = time.monotonic()
    consistent = asyncio.run(_bouncer_load(dsn, clients, rounds))
    elapsed = time.monotonic() - started
    rejected = asyncio.run(_bouncer_rejects(dsn, "statement_timeout"))
    return {
        "ok": consistent == clients * rounds and "unsupported startup parameter" in rejected,
        "target": topo.pgbouncer.target,
        "transactions": clients * rounds,
        "consistent": consistent,
        "seconds": round(elapsed, 2),
        "statement_timeout_at_startup": rejected,
    }


def check_pgbouncer_after_failover(topo: Topology) -> dict[str, Any]:
    """Repoint PgBouncer at the new primary (reload) and run a smaller load through it."""
    topo.pgbouncer_follow_primary()
    time.sleep(0.5)
    result = check_pgbouncer(topo, clients=4, rounds=10)
    return {"ok": result["ok"], "target": topo.pgbouncer.target, "consistent": result["consistent"]}


# -- NATS: an R3 stream across a SIGKILLed leader --------------------------------------


async def _publish_until_acked(js: Any, msg_id: str, within: float) -> tuple[Any, int]:
    """Publish one message under msg_id, retrying time-outs under the same id."""
    deadline = time.monotonic() + within
    attempts = 0
    while True:
        attempts += 1
        try:
            ack = await js.publish(SUBJECT, msg_id.encode(), timeout=1.0,
                                   headers={"Nats-Msg-Id": msg_id})  # fmt: skip
            return ack, attempts
        except (TimeoutError, NoStreamResponseError, NatsError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _ignore(_exc: Exception) -> None:
    return None


async def _nats_leg(topo: Topology, out: dict[str, Any]) -> None:
    """Publish 10, SIGKILL the stream leader, publish again under retries, check dedupe."""
    cluster = topo.nats
    out["version"] = cluster.version()
    nc = await nats.connect(
        servers=cluster.urls.split(","),
        connect_timeout=2,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        error_cb=_ignore,  # the killed server's EOF is expected
    )
    try:
        js = nc.jetstream(timeout=2)
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[SUBJECT], num_replicas=3, duplicate_window=120)
        )
        for i in range(1, 11):
            await _publish_until_acked(js, f"m-{i}", 10)
        leader = out["killed_leader"] = await asyncio.to_thread(cluster.wait_leader_known, STREAM)
        await asyncio.to_thread(cluster.kill, leader)
        watch = asyncio.create_task(
            asyncio.to_thread(cluster.wait_stream_leader, STREAM, leader, 60)
        )
        _, out["publish_attempts_after_kill"] = await _publish_until_acked(js, "m-11", 60)
        out["first_ack_after_kill_s"] = round(time.monotonic() - (cluster.killed_at or 0), 2)
        out["leader_election_s"] = round(await watch, 2)
        out["new_leader"] = await asyncio.to_thread(cluster.stream_leader, STREAM)
        dups = [(await _publish_until_acked(js, msg_id, 10))[0] for msg_id in ("m-5", "m-11")]
        out["duplicates_detected"] = [bool(ack.duplicate) for ack in dups]
        await asyncio.to_thread(cluster.restart, leader)
        catch_up = await asyncio.to_thread(cluster.wait_stream_current, STREAM, 60)
        out["restarted_node_current_s"] = round(catch_up, 2)
        out["messages"] = (await js.stream_info(STREAM)).state.messages
        out["ok"] = out["messages"] == 11 and all(out["duplicates_detected"])
    finally:
        await nc.close()


def check_nats(topo: Topology) -> dict[str, Any]:
    """The NATS leg; what it measured even when a later step fails."""
    out: dict[str, Any] = {"ok": False}
    try:
        asyncio.run(_nats_leg(topo, out))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


# -- HAProxy: round robin over two trivial backends, one SIGKILLed ---------------------


def _http_backend_command(topo: Topology) -> Any:
    """`python -m http.server` per port, serving readyz and whoami from its own folder."""

    def command(port: int) -> list[str]:
        folder = topo.base_dir / "app" / f"www-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "readyz").write_text("ok\n")
        (folder / "whoami").write_text(str(port))
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                "--directory", str(folder)]  # fmt: skip

    return command


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _all_backends_down(topo: Topology, url: str) -> tuple[int, str]:
    """What a client gets with every backend SIGKILLed (then they are started again)."""
    for app in topo.apis:
        topo.kill_app(app.name)
    answer = _get(url)
    for app in topo.apis:
        topo.restart_app(app.name)
    topo.haproxy.wait_backends_up(len(topo.apis), 30)
    return answer


def check_haproxy(topo: Topology) -> dict[str, Any]:
    """Balanced answers; all answered while one backend is SIGKILLed; it comes back UP."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), procs.TAG: topo.tag}
    up_s = topo.start_apis(env=env, command=_http_backend_command(topo), timeout=30)
    url = f"{topo.haproxy.url}/whoami"
    seen = [_get(url)[1] for _ in range(6)]
    topo.kill_app("api1")
    during = [_get(url) for _ in range(20)]
    down_s = procs.wait_until(
        "api1 DOWN", lambda: topo.haproxy.backend_status().get("api1", "").startswith("DOWN"), 10
    )[1]
    topo.restart_app("api1")
    back_up_s = topo.haproxy.wait_backends_up(2, 30)
    none_left = _all_backends_down(topo, url)
    balanced = len(set(seen)) == 2
    all_ok = all(status == 200 for status, _ in during)
    return {
        "ok": balanced and all_ok and none_left[0] == 503 and '"unavailable"' in none_left[1],
        "with_no_backend": none_left,
        "backends_up_s": round(up_s, 2),
        "round_robin": seen,
        "answered_200_with_backend_killed": sum(status == 200 for status, _ in during),
        "requests_with_backend_killed": len(during),
        "marked_down_s": round(down_s, 2),
        "back_up_s": round(back_up_s, 2),
    }


# -- run ------------------------------------------------------------------------------


def main() -> int:
    """Run every leg; exit 0 when all pass."""
    started = time.monotonic()
    summary: dict[str, Any] = {"base_dir": str(BASE_DIR)}
    legs: list[tuple[str, Callable[[Topology], dict[str, Any]]]] = [
        ("pgbouncer", check_pgbouncer),
        ("postgres_failover", check_postgres),
        ("pgbouncer_after_failover", check_pgbouncer_after_failover),
        ("nats", check_nats),
        ("haproxy", check_haproxy),
    ]
    try:
        with Topology(BASE_DIR, apis=2, max_seconds=400) as topo:
            summary["startup_s"] = {k: round(v, 2) for k, v in topo.timings.items()}
            summary["topology"] = topo.info()
            for name, leg in legs:
                try:
                    summary[name] = leg(topo)
                except Exception as exc:
                    summary[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    except KeyboardInterrupt as exc:
        summary["interrupted"] = str(exc)
    summary["ok"] = all(summary.get(name, {}).get("ok") for name, _ in legs)
    summary["total_s"] = round(time.monotonic() - started, 2)
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
