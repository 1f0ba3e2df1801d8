"""The chaos topology on loopback: PostgreSQL failover, PgBouncer, NATS cluster, HAProxy, API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from chaos import procs
from chaos.bouncer import PgBouncer
from chaos.lb import HaProxy
from chaos.natscluster import NatsCluster, NatsNode
from chaos.pg import PgCluster

MARKER = ".chaos-topology"  # a base_dir we may wipe carries this file
SUBDIRS = ("pg", "pgbouncer", "nats", "haproxy", "app", "logs")
VENV_BIN = Path(sys.executable).parent

Command = Callable[[int], list[str]]  # port (0 for a relay) → argv


def default_api_command(port: int) -> list[str]:
    """`orders-api serve` on one port, one worker."""
    return [str(VENV_BIN / "orders-api"), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip


def default_relay_command(_port: int) -> list[str]:
    """`orders-api relay`."""
    return [str(VENV_BIN / "orders-api"), "relay"]


@dataclass
class AppProc:
    """An API instance or relay we started: its name, port (0 for a relay), command and env."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    proc: procs.Proc | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()


class Topology:
    """Starts PostgreSQL (pg_auto_failover), PgBouncer, a NATS cluster and HAProxy in base_dir.

    Use as a context manager: leaving it stops everything it started, also on an exception or
    SIGTERM; a watchdog process kills what is left if this process dies, and leftovers of an
    earlier run in the same base_dir are killed at the start. Blocking (call the fault methods
    from a thread, e.g. asyncio.to_thread, inside an event loop).
    """

    def __init__(
        self,
        base_dir: str | Path,
        *,
        apis: int = 2,
        nats_nodes: int = 3,
        max_seconds: float = 900,
        monitor_gucs: dict[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.tag = str(self.base_dir)
        self.log_dir = self.base_dir / "logs"
        self.max_seconds = max_seconds
        ports = procs.free_ports(3 + 1 + 3 * nats_nodes + 1 + apis)
        self.pg = PgCluster(self.base_dir / "pg", self.log_dir, ports[0:3], self.tag, monitor_gucs)
        self.pgbouncer = PgBouncer(self.base_dir / "pgbouncer", self.log_dir, ports[3], self.tag)
        nats_ports = ports[4 : 4 + 3 * nats_nodes]
        self.nats = NatsCluster(self.base_dir / "nats", self.log_dir, nats_ports, self.tag)
        self.api_ports = ports[5 + 3 * nats_nodes :]
        self.haproxy = HaProxy(
            self.base_dir / "haproxy", self.log_dir, ports[4 + 3 * nats_nodes], self.api_ports,
            self.tag,
        )  # fmt: skip
        self.apis: list[AppProc] = []
        self.relays: list[AppProc] = []
        self.timings: dict[str, float] = {}
        self._watchdog: procs.Proc | None = None
        self._old_sigterm: Any = None

    # -- context manager ----------------------------------------------------------------

    def __enter__(self) -> Topology:
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Clean base_dir, then PostgreSQL, PgBouncer, NATS and HAProxy, in that order."""
        self._prepare_base_dir()
        procs.become_subreaper()
        self._start_watchdog()
        started = time.monotonic()
        self.timings.update({f"pg_{k}": v for k, v in self.pg.start().items()})
        primary = self.pg.primary() or self.pg.nodes[0].name
        self.timings["pgbouncer"] = self.pgbouncer.start("127.0.0.1", self.pg.node(primary).port)
        self.timings["nats"] = self.nats.start()
        self.timings["haproxy"] = self.haproxy.start()
        self.timings["total"] = time.monotonic() - started
        self.write_info()

    def _prepare_base_dir(self) -> None:
        base = self.base_dir
        if base.exists() and any(base.iterdir()) and not (base / MARKER).exists():
            raise RuntimeError(f"{base} is not empty and not a chaos topology folder: not wiping")
        base.mkdir(parents=True, exist_ok=True)
        (base / MARKER).write_text("chaos topology base directory: wiped at each start\n")
        os.chmod(base, 0o755)  # the postgres user must reach its folders below
        for _ in range(3):
            if not procs.sweep_leftovers(base):
                break
            time.sleep(0.5)
        for sub in SUBDIRS:
            shutil.rmtree(base / sub, ignore_errors=True)
        self.log_dir.mkdir()

    def _start_watchdog(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != procs.TAG}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        self._watchdog = procs.spawn(
            "watchdog",
            [sys.executable, "-m", "chaos.watchdog", str(os.getpid()), self.tag,
             str(self.max_seconds)],
            log_dir=self.log_dir,
            env=env,
            cwd=self.base_dir,
        )  # fmt: skip

    # -- the application ----------------------------------------------------------------

    def app_env(
        self, *, via_pgbouncer: bool = False, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for orders-api processes: DATABASE_URL and NATS_URL of this topology."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "NATS_"))}
        database_url = self.pgbouncer.dsn() + "?pgbouncer=true" if via_pgbouncer else self.pg.dsn
        env.update(
            DATABASE_URL=database_url,
            NATS_URL=self.nats.urls,
            RELAY_STREAM_REPLICAS="3",
            **{procs.TAG: self.tag},
        )
        env.update(extra or {})
        return env

    def start_apis(
        self,
        env: Mapping[str, str] | None = None,
        command: Command = default_api_command,
        timeout: float = 60,
    ) -> float:
        """One API instance per HAProxy backend port; seconds until HAProxy sees all UP."""
        started = time.monotonic()
        for i, port in enumerate(self.api_ports, 1):
            app = AppProc(f"api{i}", port, command(port), dict(env or self.app_env()))
            self.apis.append(app)
            self._spawn_app(app)
        self.haproxy.wait_backends_up(len(self.api_ports), timeout)
        return time.monotonic() - started

    def start_relays(
        self,
        count: int = 2,
        env: Mapping[str, str] | None = None,
        command: Command = default_relay_command,
    ) -> None:
        """`count` relays against this topology's database and NATS cluster."""
        for i in range(1, count + 1):
            app = AppProc(f"relay{i}", 0, command(0), dict(env or self.app_env()))
            self.relays.append(app)
            self._spawn_app(app)

    def _spawn_app(self, app: AppProc) -> None:
        cwd = self.base_dir / "app" / app.name
        cwd.mkdir(parents=True, exist_ok=True)
        app.proc = procs.spawn(app.name, app.argv, log_dir=self.log_dir, env=app.env, cwd=cwd)

    def app(self, name: str) -> AppProc:
        return next(a for a in [*self.apis, *self.relays] if a.name == name)

    def kill_app(self, name: str) -> None:
        """SIGKILL an API instance or relay (its whole process group)."""
        app = self.app(name)
        if app.proc is not None:
            app.proc.kill(signal.SIGKILL)
            app.proc.wait(5)

    def restart_app(self, name: str) -> None:
        """Start a killed API instance or relay again with its command and env."""
        app = self.app(name)
        if app.running():
            raise RuntimeError(f"{name} is still running")
        self._spawn_app(app)

    def wait_api_ready(self, name: str, timeout: float = 30) -> float:
        """Until the instance answers 200 on /readyz directly."""
        port = self.app(name).port

        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)

        return procs.wait_until(f"{name} ready", ready, timeout, 0.2)[1]

    def run_cli(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> str:
        """`orders-api ARGS` to completion against this topology (e.g. "migrate"); its output."""
        argv = [str(VENV_BIN / "orders-api"), *args]
        cwd = self.base_dir / "app"
        cwd.mkdir(parents=True, exist_ok=True)
        result = procs.run(argv, env=env or self.app_env(), cwd=cwd, timeout=timeout)
        return result.stdout + result.stderr

    # -- faults in one place --------------------------------------------------------------

    def kill_pg_primary(self) -> str:
        """SIGKILL the PostgreSQL primary's keeper and postmaster; its name."""
        return self.pg.kill_primary()

    def pgbouncer_follow_primary(self) -> str:
        """Repoint PgBouncer at the node that is primary now (after a failover); its name."""
        primary = self.pg.primary()
        if primary is None:
            raise RuntimeError(f"no settled primary: {self.pg.states()}")
        self.pgbouncer.repoint("127.0.0.1", self.pg.node(primary).port)
        return primary

    def kill_nats_stream_leader(self, stream: str) -> str:
        """SIGKILL the server leading `stream`; its name."""
        leader = self.nats.wait_leader_known(stream)
        self.nats.kill(leader)
        return leader

    # -- info and stop --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Addresses and pids of every part (also written to base_dir/topology.json)."""
        return {
            "base_dir": str(self.base_dir),
            "postgres": {
                "dsn": self.pg.dsn,
                "monitor": self.pg.monitor_uri,
                "nodes": {
                    n.name: {
                        "port": n.port,
                        "pgdata": str(n.pgdata),
                        "keeper_pid": n.keeper.pid if n.keeper else None,
                        "postmaster_pid": n.postmaster_pid(),
                    }
                    for n in self.pg.nodes
                },
            },
            "pgbouncer": {"dsn": self.pgbouncer.dsn(), "pid": _pid(self.pgbouncer.proc)},
            "nats": {
                "urls": self.nats.urls,
                "nodes": {n.name: _nats_node_info(n) for n in self.nats.nodes},
            },
            "haproxy": {
                "url": self.haproxy.url,
                "backends": self.api_ports,
                "pid": _pid(self.haproxy.proc),
            },
            "apps": {
                a.name: {"port": a.port, "pid": _pid(a.proc)} for a in [*self.apis, *self.relays]
            },
            "logs": str(self.log_dir),
        }

    def write_info(self) -> None:
        (self.base_dir / "topology.json").write_text(json.dumps(self.info(), indent=2) + "\n")

    def stop(self) -> None:
        """Stop everything started, newest first; then sweep anything tagged with base_dir."""
        for app in [*self.relays, *self.apis]:
            if app.proc is not None:
                app.proc.kill(signal.SIGKILL)
                app.proc.wait(3)
        for stop in (self.haproxy.stop, self.nats.stop, self.pgbouncer.stop, self.pg.stop):
            with contextlib.suppress(Exception):
                stop()
        with contextlib.suppress(Exception):
            procs.sweep_leftovers(self.base_dir)
            procs.reap_orphans()
        if self._watchdog is not None:
            self._watchdog.kill(signal.SIGKILL)
            self._watchdog.wait(2)
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def _nats_node_info(node: NatsNode) -> dict[str, Any]:
    return {
        "client": node.client_port,
        "route": node.route_port,
        "http": node.http_port,
        "pid": _pid(node.proc),
    }


def _pid(proc: procs.Proc | None) -> int | None:
    return proc.pid if proc is not None else None


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
