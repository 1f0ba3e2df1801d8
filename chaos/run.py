"""The chaos run: load through HAProxy while parts are SIGKILLed at known times, then verify.

`python -m chaos.run [--seed N] [--duration S] [--pgbouncer follow|none|per-node]` (`make chaos`).
It starts the topology (pg_auto_failover monitor + primary + sync standby, PgBouncer, 3 NATS
servers, HAProxy), migrates through the direct multi-host DSN, starts 2 API instances behind
HAProxy (api1 on the multi-host DSN; api2 through docker-compose.yml's PgBouncer, which
chaos/compose/pgbouncer-follow.sh keeps on the primary) and 2 relays (multi-host DSN, stream
R3 on the 3 servers), preloads a paging tenant, then for `duration` seconds runs the load of
chaos/load.py while these faults happen at fixed fractions of the duration:

    10 %  SIGKILL api1            restarted 3 s later
    20 %  SIGKILL relay1          restarted 2 s later
    33 %  SIGKILL the PostgreSQL primary (keeper + postmaster); once the standby is promoted the
          old primary's keeper is started again and rejoins as the standby
    65 %  SIGKILL the NATS server leading the stream; restarted once a new leader is elected

Then it sends one create straight to each API instance, drains (every outbox row published,
bounded), checks (chaos/verify.py), prints a JSON summary, writes it to
BASE_DIR/chaos-summary.json, and exits 1 when a check failed. Everything runs on 127.0.0.1
under BASE_DIR (CHAOS_BASE_DIR, default /tmp/orders-chaos); a watchdog stops the topology if
this process dies or overruns 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from chaos import procs
from chaos.bouncer import PGBOUNCER, PgBouncer
from chaos.load import CHANGE_COPIES, CREATE_COPIES, FLOW_TENANTS, Load, OrderRecord, Recorder
from chaos.topology import Topology
from chaos.verify import (
    check_acknowledged_writes,
    check_no_500,
    check_one_order_per_key,
    check_outbox_equals_stream,
    check_outbox_rows,
    check_paging,
    check_resolved,
    check_versions,
    outbox_progress,
    per_op_statuses,
    read_db,
    read_stream,
    stream_count,
)

T = TypeVar("T")

STREAM = "ORDERS"
COMPOSE = Path(__file__).resolve().parent / "compose"  # docker-compose.yml's config files
HARD_CAP_S = 600  # the watchdog's limit: nothing outlives it
FAULTS = {"api": 0.10, "relay": 0.20, "postgres": 0.33, "nats": 0.65}
API_RESTART_AFTER_S = 3.0
RELAY_RESTART_AFTER_S = 2.0
RETRY_GRACE_S = 60.0  # after the load ends, unknown outcomes are retried this long
DRAIN_TIMEOUT_S = 90.0
PRELOAD = 150  # orders in the paging tenant before the load
# For the relays: a batch claimed by a SIGKILLed relay comes back after 10 s, not 30.
APP_EXTRA_ENV = {"RELAY_LEASE_SECONDS": "10", "LOG_LEVEL": "INFO"}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Run:
    """One chaos run on a started topology."""

    def __init__(self, topo: Topology, args: argparse.Namespace) -> None:
        self.topo = topo
        self.args = args
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.rec = Recorder(self.t0)
        self.faults: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.bouncers: list[PgBouncer] = []  # --pgbouncer per-node: the ones we started
        self.extra_procs: list[procs.Proc] = []  # --pgbouncer follow: pgbouncer + follower
        self.follow_ini: Path | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def at(self, offset: float) -> None:
        await asyncio.sleep(max(0.0, offset - self.now()))

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # -- faults ---------------------------------------------------------------------------

    async def fault_api(self, at: float, name: str = "api1") -> None:
        topo = self.topo
        await self.at(at)
        out = self.faults["api_instance"] = {"target": name, "at_s": _r(self.now())}
        killed = time.monotonic()
        await self.blocking(topo.kill_app, name)
        try:
            down = await self.blocking(
                procs.wait_until,
                f"HAProxy marks {name} DOWN",
                lambda: topo.haproxy.backend_status().get(name, "").startswith("DOWN"),
                API_RESTART_AFTER_S,
                0.05,
            )
            out["marked_down_s"] = _r(down[1])
        except procs.WaitTimeout:
            out["marked_down_s"] = None
        await asyncio.sleep(max(0.0, killed + API_RESTART_AFTER_S - time.monotonic()))
        await self.blocking(topo.restart_app, name)
        out["restarted_after_s"] = _r(time.monotonic() - killed)
        ready = await self.blocking(topo.wait_api_ready, name, 30)
        out["ready_after_restart_s"] = _r(ready)
        await self.blocking(
            procs.wait_until,
            f"HAProxy marks {name} UP",
            lambda: topo.haproxy.backend_status().get(name, "").startswith("UP"),
            30,
            0.05,
        )
        out["recovery_s"] = _r(time.monotonic() - killed)  # kill -> back in rotation

    async def fault_relay(self, at: float, name: str = "relay1") -> None:
        topo = self.topo
        await self.at(at)
        out = self.faults["relay"] = {"target": name, "at_s": _r(self.now())}
        killed = time.monotonic()
        killed_wall = time.time()
        await self.blocking(topo.kill_app, name)
        await asyncio.sleep(RELAY_RESTART_AFTER_S)
        log = topo.app(name).proc
        offset = log.log_path.stat().st_size if log is not None else 0
        await self.blocking(topo.restart_app, name)
        out["restarted_after_s"] = _r(time.monotonic() - killed)
        proc = topo.app(name).proc
        assert proc is not None

        def connected() -> bool:
            with open(proc.log_path, "rb") as f:
                f.seek(offset)
                return b"broker connected" in f.read()

        try:
            await self.blocking(procs.wait_until, f"{name} connected", connected, 30, 0.05)
            out["recovery_s"] = _r(time.monotonic() - killed)  # kill -> restarted and connected
        except procs.WaitTimeout:
            out["recovery_s"] = None
        out["backlog_at_kill_published_s"] = await self._backlog_published(killed_wall, within=60)

    async def _backlog_published(self, since_wall: float, within: float) -> float | None:
        """Seconds from `since_wall` until every outbox row created before it is published."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                conn = await asyncpg.connect(self.topo.pg.dsn, timeout=2)
                try:
                    left = await conn.fetchval(
                        "SELECT count(*) FROM outbox WHERE published_at IS NULL "
                        "AND created_at < to_timestamp($1)",
                        since_wall,
                    )
                finally:
                    await conn.close()
                if left == 0:
                    return _r(time.time() - since_wall)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                pass
            await asyncio.sleep(0.25)
        return None

    async def fault_postgres(self, at: float) -> None:
        topo = self.topo
        await self.at(at)
        out = self.faults["postgres"] = {"at_s": None}
        sync_before = await self._sync_state()
        out["at_s"] = _r(self.now())
        old = await self.blocking(topo.kill_pg_primary)
        out["killed"] = old
        out["sync_state_before_kill"] = sync_before
        out["promoted_s"] = _r(await self.blocking(topo.pg.wait_for_new_primary, old, 60))
        out["new_primary"] = await self.blocking(topo.pg.primary)
        if self.follow_ini is not None and out["new_primary"]:  # pgbouncer-follow's repoint
            port = f"port={topo.pg.node(out['new_primary']).port} "
            ini = self.follow_ini
            await self.blocking(
                procs.wait_until, "pgbouncer-follow repoints", lambda: port in ini.read_text(), 30
            )
            out["pgbouncer_repointed_s"] = _r(time.monotonic() - (topo.pg.killed_at or 0))
        await self.blocking(topo.pg.restart_node, old)
        await self.blocking(topo.pg.wait_healthy, 90)
        out["healed_s"] = _r(time.monotonic() - (topo.pg.killed_at or 0))  # old one is standby
        out["states_after"] = await self.blocking(topo.pg.states)
        out["sync_state_after_heal"] = await self._sync_state()

    async def _sync_state(self) -> dict[str, Any]:
        try:
            conn = await asyncpg.connect(self.topo.pg.dsn, timeout=3)
            try:
                names = await conn.fetchval("SHOW synchronous_standby_names")
                rows = await conn.fetch(
                    "SELECT application_name, sync_state FROM pg_stat_replication"
                )
            finally:
                await conn.close()
            return {"synchronous_standby_names": names, **{r[0]: r[1] for r in rows}}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def fault_nats(self, at: float) -> None:
        topo = self.topo
        await self.at(at)
        out = self.faults["nats_leader"] = {"at_s": _r(self.now())}
        killed_wall = time.time()
        leader = await self.blocking(topo.kill_nats_stream_leader, STREAM)
        out["killed"] = leader
        out["elected_s"] = _r(await self.blocking(topo.nats.wait_stream_leader, STREAM, leader, 60))
        out["new_leader"] = await self.blocking(topo.nats.stream_leader, STREAM)
        await self.blocking(topo.nats.restart, leader)
        out["restarted_after_s"] = _r(time.monotonic() - (topo.nats.killed_at or 0))
        await self.blocking(topo.nats.wait_stream_current, STREAM, 60)
        out["replicas_current_s"] = _r(time.monotonic() - (topo.nats.killed_at or 0))
        out["killed_wall"] = killed_wall  # publishing resumed: from the outbox, after the drain

    # -- the run --------------------------------------------------------------------------

    async def start_apps(self) -> dict[str, float]:
        topo = self.topo
        timings: dict[str, float] = {}
        started = time.monotonic()
        out = await self.blocking(topo.run_cli, "migrate")
        timings["migrate"] = time.monotonic() - started
        self.notes.append(out.strip().splitlines()[-1] if out.strip() else "migrated")
        api_env = topo.app_env(extra=APP_EXTRA_ENV)
        timings["apis"] = await self.blocking(topo.start_apis, api_env)
        mode = self.args.pgbouncer
        if mode != "none":  # api2 (per-node: and relay2) through PgBouncer
            if mode == "per-node":
                url = await self.blocking(self.start_node_bouncers)
            else:
                url = await self.blocking(self.start_follow_bouncer)
            env2 = {**api_env, "DATABASE_URL": url}
            await self.blocking(topo.kill_app, "api2")
            topo.app("api2").env = env2
            await self.blocking(topo.restart_app, "api2")
            await self.blocking(topo.haproxy.wait_backends_up, len(topo.apis), 60)
        started = time.monotonic()
        await self.blocking(topo.start_relays, 2, api_env)
        if mode == "per-node":
            await self.blocking(topo.kill_app, "relay2")
            topo.app("relay2").env = env2
            await self.blocking(topo.restart_app, "relay2")
        await self.blocking(
            procs.wait_until,
            f"stream {STREAM} created with a leader",
            lambda: topo.nats.stream_leader(STREAM),
            60,
        )
        timings["relays_stream"] = time.monotonic() - started
        topo.write_info()
        return {k: round(v, 2) for k, v in timings.items()}

    def start_node_bouncers(self) -> str:
        """One PgBouncer per PostgreSQL node (the topology's own serves the first primary);
        the multi-host DATABASE_URL over them: the client finds the writable node itself, so
        nothing repoints a bouncer after a failover."""
        topo = self.topo
        first = topo.pgbouncer.target
        assert first is not None
        ports = {first[1]: topo.pgbouncer.port}
        for node in topo.pg.nodes:
            if node.port in ports:
                continue
            taken = {topo.pgbouncer.port, *topo.api_ports, topo.haproxy.port}
            bouncer = PgBouncer(
                topo.base_dir / f"pgbouncer-{node.name}",
                topo.log_dir / f"pgbouncer-{node.name}",
                procs.free_ports(1, taken)[0],
                topo.tag,
            )
            bouncer.start("127.0.0.1", node.port)
            self.bouncers.append(bouncer)
            ports[node.port] = bouncer.port
        hosts = ",".join(f"127.0.0.1:{ports[node.port]}" for node in topo.pg.nodes)
        return (
            f"postgresql://postgres@{hosts}/orders?target_session_attrs=read-write&pgbouncer=true"
        )

    def start_follow_bouncer(self) -> str:
        """docker-compose.yml's PgBouncer on loopback: chaos/compose/pgbouncer.ini, its
        [databases] entry written by chaos/compose/pgbouncer-follow.sh from the monitor's
        view of the primary (and RELOADed after a failover); the URL for the API."""
        topo = self.topo
        root = topo.base_dir / "pgbouncer-follow"
        (root / "primary").mkdir(parents=True, exist_ok=True)
        taken = {topo.pgbouncer.port, *topo.api_ports, topo.haproxy.port}
        port = procs.free_ports(1, taken)[0]
        ini = (
            (COMPOSE / "pgbouncer.ini")
            .read_text()
            .replace("/etc/pgbouncer/primary/", f"{root}/primary/")
            .replace("/etc/pgbouncer/userlist.txt", str(COMPOSE / "userlist.txt"))
            .replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
            .replace("listen_port = 6432", f"listen_port = {port}")
        )
        (root / "pgbouncer.ini").write_text(ini)
        self.follow_ini = root / "primary" / "databases.ini"
        env = {
            "PATH": "/usr/lib/postgresql/15/bin:/usr/bin:/bin",
            procs.TAG: topo.tag,
            "MONITOR_URL": topo.pg.monitor_uri,
            "PGBOUNCER_ADMIN_URL": f"postgresql://postgres@127.0.0.1:{port}/pgbouncer",
            "DATABASES_INI": str(self.follow_ini),
            "DBNAME": "orders",
        }
        self.extra_procs.append(
            procs.spawn("pgbouncer-follow", ["sh", str(COMPOSE / "pgbouncer-follow.sh")],
                        log_dir=topo.log_dir, env=env, cwd=root)
        )  # fmt: skip
        ini_path = self.follow_ini
        procs.wait_until("pgbouncer-follow writes the primary", ini_path.exists, 30)
        procs.chown_tree(root, "postgres")
        self.extra_procs.append(
            procs.spawn("pgbouncer-compose", [PGBOUNCER, str(root / "pgbouncer.ini")],
                        log_dir=topo.log_dir, env=env, cwd=root, user="postgres")
        )  # fmt: skip
        procs.wait_until("pgbouncer-compose listens", lambda: procs.port_open(port), 15)
        return f"postgresql://postgres@127.0.0.1:{port}/orders?pgbouncer=true"

    def stop_bouncers(self) -> None:
        for bouncer in self.bouncers:
            bouncer.stop()
        for proc in self.extra_procs:
            proc.kill(signal.SIGKILL)
            proc.wait(3)

    async def drain(self) -> dict[str, Any]:
        """Until no outbox row is pending and the stream holds as many messages (bounded)."""
        started = time.monotonic()
        deadline = started + DRAIN_TIMEOUT_S
        progress: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                progress = await outbox_progress(self.topo.pg.dsn)
                if progress["pending"] == 0:
                    break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
        drained_s = time.monotonic() - started
        messages = -1
        while time.monotonic() < deadline:
            try:
                messages = await stream_count(self.topo.nats.urls, STREAM)
                if messages >= progress.get("total", 0):
                    break
            except Exception:
                pass
            await asyncio.sleep(0.5)
        return {
            "ok": progress.get("pending") == 0 and messages == progress.get("total"),
            "outbox_drained_s": _r(drained_s),
            "seconds": _r(time.monotonic() - started),
            "outbox": progress,
            "stream_messages": messages,
        }

    async def standby_matches(self) -> dict[str, Any]:
        """After healing, the standby holds the same orders and outbox as the primary."""
        pg = self.topo.pg
        digest = (
            "SELECT (SELECT md5(coalesce(string_agg(id::text || status || version, ','"
            " ORDER BY id), '')) FROM orders), (SELECT count(*) FROM outbox)"
        )

        async def read(dsn: str) -> tuple[Any, ...]:
            conn = await asyncpg.connect(dsn, timeout=3)
            try:
                row = await conn.fetchrow(digest)
                return tuple(row)
            finally:
                await conn.close()

        primary = await self.blocking(pg.primary)
        standby = next((n.name for n in pg.nodes if n.name != primary), None)
        if primary is None or standby is None:
            return {"ok": False, "states": await self.blocking(pg.states)}
        a = b = None
        for _ in range(40):
            a = await read(pg.node_dsn(primary))
            b = await read(pg.node_dsn(standby))
            if a == b:
                break
            await asyncio.sleep(0.25)
        return {"ok": a == b, "primary": primary, "standby": standby,
                "outbox_rows": {primary: a and a[1], standby: b and b[1]}}  # fmt: skip

    async def main(self) -> dict[str, Any]:
        args = self.args
        summary: dict[str, Any] = {}
        summary["startup_s"] = await self.start_apps()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
        timeout = httpx.Timeout(10.0, connect=3.0)
        async with httpx.AsyncClient(
            base_url=self.topo.haproxy.url, timeout=timeout, limits=limits
        ) as client:
            preload_rec = Recorder(self.t0)
            preload = Load(client, self.topo.pg.dsn, args.seed, 0, preload_rec, 0, self.now() + 60)
            started = time.monotonic()
            await preload.preload(PRELOAD)
            summary["startup_s"]["preload"] = _r(time.monotonic() - started)
            # the load's clock starts now: fault times are offsets from here
            self.t0 = time.monotonic()
            self.wall0 = time.time()
            self.rec = Recorder(self.t0)
            self.rec.counts.update(preload_rec.counts)
            load = Load(
                client,
                self.topo.pg.dsn,
                args.seed,
                args.flows,
                self.rec,
                args.duration,
                args.duration + RETRY_GRACE_S,
            )
            load.orders.extend(preload.orders)
            d = args.duration
            fault_tasks = [
                asyncio.create_task(self.fault_api(d * FAULTS["api"])),
                asyncio.create_task(self.fault_relay(d * FAULTS["relay"])),
                asyncio.create_task(self.fault_postgres(d * FAULTS["postgres"])),
                asyncio.create_task(self.fault_nats(d * FAULTS["nats"])),
            ]
            await load.run()
            load_s = self.now()
            fault_errors = []
            for task in fault_tasks:
                try:
                    await task
                except Exception as exc:
                    fault_errors.append(f"{type(exc).__name__}: {exc}")
        summary["load_s"] = _r(load_s)
        instances = await self.probe_instances(load)
        summary["drain"] = await self.drain()
        db = await read_db(self.topo.pg.dsn)
        stream = await read_stream(self.topo.nats.urls, STREAM)
        summary.update(self.figures(load, db))
        summary["fault_errors"] = fault_errors
        checks = {
            "acknowledged_writes_exist": check_acknowledged_writes(load, db),
            "one_order_per_key_same_id": check_one_order_per_key(load, db),
            "one_outbox_row_per_closed_order": check_outbox_rows(db),
            "outbox_ids_equal_stream_ids": check_outbox_equals_stream(db, stream),
            "versions_without_gaps": check_versions(load, db),
            "paging_no_duplicate_no_skip": check_paging(load, db),
            "no_500": check_no_500(self.rec, self.topo.log_dir, [a.name for a in self.topo.apis]),
            "every_request_answered_as_expected": check_resolved(self.rec),
            "drained": {"ok": summary["drain"]["ok"]},
            "standby_matches_primary": await self.standby_matches(),
            "faults_ran": {"ok": not fault_errors and len(self.faults) == 4},
            "every_instance_writes_after_the_faults": instances,
        }
        summary["checks"] = checks
        return summary

    async def probe_instances(self, load: Load, within: float = 20) -> dict[str, Any]:
        """After the faults, a create straight to each API instance (not through HAProxy): each
        process must have recovered by itself (HAProxy alone would hide one that answers 503
        forever while /readyz passes)."""
        out: dict[str, Any] = {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)) as direct:
            for app in self.topo.apis:
                probe = Load(direct, self.topo.pg.dsn, self.args.seed, 0, self.rec, 0,
                             self.now() + within)  # fmt: skip
                record = OrderRecord(FLOW_TENANTS[0], f"chaos-{self.args.seed}-probe-{app.name}",
                                     "draft", 0)  # fmt: skip
                rng = random.Random(record.key)
                started = time.monotonic()
                answer = await probe.request(
                    "create", "POST", f"http://127.0.0.1:{app.port}/orders", record.tenant, rng,
                    {"Idempotency-Key": record.key}, {},
                )  # fmt: skip
                record.creates = [answer]
                load.orders.append(record)
                out[app.name] = {
                    "status": answer.status if answer else None,
                    "attempts": answer.attempts if answer else None,
                    "seconds": _r(time.monotonic() - started),
                }
        ok = all(v["status"] in (200, 201) for v in out.values())
        return {"ok": ok, **out}

    def figures(self, load: Load, db: Any) -> dict[str, Any]:
        """Counts, retries, failover gap and recovery times."""
        rec = self.rec
        pg = self.faults.get("postgres", {})
        nats_fault = self.faults.get("nats_leader", {})
        gap = failover_gap(rec.writes, pg.get("at_s"))
        if "killed_wall" in nats_fault:
            nats_fault["publish_resumed_s"] = publish_resumed(db, nats_fault.pop("killed_wall"))
        relay = self.faults.get("relay", {})
        api = self.faults.get("api_instance", {})
        return {
            "requests": per_op_statuses(rec),
            "requests_total": sum(rec.counts.values()),
            "retries": dict(rec.retries),
            "orders": {
                "keys": len(load.orders),
                "create_copies_per_key": CREATE_COPIES,
                "change_copies": CHANGE_COPIES,
                "planned": {
                    p: sum(1 for o in load.orders if o.plan == p)
                    for p in ("draft", "confirmed", "closed")
                },
            },
            "scans": len(load.scans),
            "failover_gap": gap,
            "recovery_s": {
                "api_instance": api.get("recovery_s"),
                "relay": relay.get("recovery_s"),
                "postgres_promoted": pg.get("promoted_s"),
                "postgres_first_write_ok": gap.get("kill_to_first_success_s"),
                "postgres_healed": pg.get("healed_s"),
                "nats_leader_elected": nats_fault.get("elected_s"),
                "nats_publish_resumed": nats_fault.get("publish_resumed_s"),
                "nats_replicas_current": nats_fault.get("replicas_current_s"),
            },
            "faults": self.faults,
        }


def failover_gap(
    writes: list[tuple[float, float, str, str]], kill_at: float | None
) -> dict[str, Any]:
    """First failed write after the kill -> first successful write sent after that failure.

    Times are when the answers arrived; a success counts only when its request was sent after
    the first failure came back (one sent before the kill may be answered just after it)."""
    if kill_at is None:
        return {"error": "no PostgreSQL kill"}
    after = sorted((end, start, op, kind) for start, end, op, kind in writes if end >= kill_at)
    first_fail = next((w for w in after if w[3] == "unknown"), None)
    if first_fail is None:
        return {"first_failure_s": None, "note": "no write failed after the kill"}
    first_ok = next((w for w in after if w[3] == "ok" and w[1] > first_fail[0]), None)
    fails = [w for w in after if w[3] == "unknown"]
    window = [w for w in fails if first_ok is None or w[0] <= first_ok[0] + 30]
    return {
        "kill_at_s": _r(kill_at),
        "first_failure_s": _r(first_fail[0] - kill_at),
        "first_success_s": _r(first_ok[0] - kill_at) if first_ok else None,
        "gap_s": _r(first_ok[0] - first_fail[0]) if first_ok else None,
        "kill_to_first_success_s": _r(first_ok[0] - kill_at) if first_ok else None,
        "last_failure_s": _r(window[-1][0] - kill_at) if window else None,
        "failed_write_attempts": len(window),
    }


def publish_resumed(db: Any, killed_wall: float) -> float | None:
    """Seconds from the NATS kill to the first outbox row marked published after it.

    Rows acked just before the kill may be marked a few ms after it: the first mark more than
    0.5 s after the kill is taken (the relays publish continuously under the load)."""
    marks = sorted(
        r["published_at"].timestamp()
        for r in db.outbox
        if r["published_at"] is not None and r["published_at"].timestamp() > killed_wall + 0.5
    )
    return _r(marks[0] - killed_wall) if marks else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", "1")))
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("CHAOS_DURATION", "100")),
        help="seconds of load (faults at fixed fractions of it)",
    )
    parser.add_argument("--flows", type=int, default=6, help="concurrent order flows")
    parser.add_argument("--apis", type=int, default=2, help="API instances behind HAProxy")
    parser.add_argument("--base-dir", default=os.environ.get("CHAOS_BASE_DIR", "/tmp/orders-chaos"))
    parser.add_argument(
        "--pgbouncer",
        choices=("follow", "none", "per-node"),
        default="follow",
        help="follow (default): api2 through docker-compose.yml's PgBouncer, kept on the "
        "primary by chaos/compose/pgbouncer-follow.sh, api1 direct on the multi-host URL; "
        "none: both direct; per-node: api2 and relay2 through one PgBouncer per node with "
        "target_session_attrs=read-write (a known trap: see chaos/README.md)",
    )
    args = parser.parse_args(argv)
    if args.apis < 2 or args.duration < 40:
        parser.error("--apis must be 2 or more and --duration at least 40 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    base = Path(args.base_dir)
    summary: dict[str, Any] = {
        "seed": args.seed,
        "duration_s": args.duration,
        "flows": args.flows,
        "apis": args.apis,
        "pgbouncer": args.pgbouncer,
        "fault_schedule_s": {k: round(v * args.duration, 1) for k, v in FAULTS.items()},
    }
    try:
        with Topology(base, apis=args.apis, max_seconds=HARD_CAP_S) as topo:
            summary["base_dir"] = str(topo.base_dir)
            summary["topology_startup_s"] = {k: round(v, 2) for k, v in topo.timings.items()}
            summary["versions"] = {"nats_server": topo.nats.version()}
            run = Run(topo, args)
            try:
                budget = HARD_CAP_S - 60 - (time.monotonic() - started)
                summary.update(asyncio.run(asyncio.wait_for(run.main(), budget)))
            except Exception as exc:
                summary["error"] = f"{type(exc).__name__}: {exc}"
                summary["faults"] = run.faults
            finally:
                run.stop_bouncers()
    except KeyboardInterrupt as exc:
        summary["interrupted"] = str(exc)
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
    checks = summary.get("checks", {})
    summary["passed"] = {name: bool(c.get("ok")) for name, c in checks.items()}
    summary["ok"] = bool(checks) and all(summary["passed"].values()) and "error" not in summary
    summary["runtime_s"] = round(time.monotonic() - started, 1)
    path = base / "chaos-summary.json"
    summary["summary_path"] = str(path)
    text = json.dumps(summary, indent=2, default=str)
    if base.exists():
        path.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.write(f"chaos summary: {path} ({'PASS' if summary['ok'] else 'FAIL'})\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
