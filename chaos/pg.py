"""PostgreSQL with automatic failover: a pg_auto_failover monitor, a primary and a sync standby."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from chaos import procs

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
DBNAME = "orders"
PRIMARY_STATES = ("primary", "wait_primary", "single")

# Monitor GUCs (all PGC_SIGHUP, milliseconds). The monitor calls a primary unhealthy once its
# health check failed (period + timeout x retries) and its keeper has not reported for
# node_considered_unhealthy_timeout; the standby is promoted once the old primary reports
# demote_timeout or primary_demote_timeout has passed. Defaults are 5 s/5 s/2/2 s/20 s/30 s.
MONITOR_GUCS: dict[str, str] = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "4000",
    "pgautofailover.primary_demote_timeout": "4000",
    "pgautofailover.startup_grace_period": "2000",
}


@dataclass
class PgNode:
    """One data node: its name, port, data folder and the pg_autoctl keeper we started."""

    name: str
    port: int
    pgdata: Path
    keeper: procs.Proc | None = None

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, when the file is there."""
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None


class PgCluster:
    """A monitor and two data nodes run by pg_autoctl as the postgres OS user under root."""

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        ports: list[int],
        tag: str,
        gucs: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.log_dir = log_dir
        self.run_dir = root / "run"
        self.monitor_port, *node_ports = ports
        self.nodes = [
            PgNode(f"node{i}", port, root / f"node{i}") for i, port in enumerate(node_ports, 1)
        ]
        self.tag = tag
        self.gucs = {**MONITOR_GUCS, **(gucs or {})}
        self.monitor: procs.Proc | None = None
        self.killed_at: float | None = None

    # -- addresses ----------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """Multi-host DSN that finds the read-write node."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"postgresql://{PG_USER}@{hosts}/{DBNAME}?target_session_attrs=read-write"

    def node_dsn(self, name: str) -> str:
        """A DSN for one node."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.node(name).port}/{DBNAME}"

    @property
    def monitor_uri(self) -> str:
        return (
            f"postgres://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover"
            "?sslmode=disable"
        )

    def node(self, name: str) -> PgNode:
        return next(node for node in self.nodes if node.name == name)

    def processes(self) -> list[procs.Proc]:
        """Every keeper we started (the monitor's too)."""
        keepers = [node.keeper for node in self.nodes if node.keeper is not None]
        return [p for p in [self.monitor, *keepers] if p is not None]

    # -- start --------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> dict[str, float]:
        """Monitor, then the primary, then the standby; seconds each took."""
        self._prepare_dirs()
        timings = {"monitor": self._start_monitor(timeout)}
        first, second = self.nodes
        timings[first.name] = self._start_node(first, timeout)
        timings[second.name] = self._start_node(second, timeout)
        return timings

    def _prepare_dirs(self) -> None:
        for sub in ("run", "xdg"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        procs.chown_tree(self.root, PG_USER)

    def env(self) -> dict[str, str]:
        """Environment for pg_autoctl: private config, state, pid and socket folders."""
        return {
            "PATH": f"{PG_BIN}:/usr/bin:/bin",
            "HOME": str(self.root),
            "LC_ALL": "C.UTF-8",
            "XDG_CONFIG_HOME": str(self.root / "xdg" / "config"),
            "XDG_DATA_HOME": str(self.root / "xdg" / "data"),
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "PGHOST": str(self.run_dir),
            "PG_REGRESS_SOCK_DIR": str(self.run_dir),  # makes pg_autoctl pass -k to postgres
            procs.TAG: self.tag,
        }

    def _autoctl(self, *args: str, timeout: float = 60) -> str:
        result = procs.run(
            ["pg_autoctl", *args],
            env=self.env(),
            cwd=self.root,
            user=PG_USER,
            timeout=timeout,
        )
        return result.stdout

    def _spawn_keeper(self, name: str, *args: str) -> procs.Proc:
        return procs.spawn(
            name,
            ["pg_autoctl", *args],
            log_dir=self.log_dir,
            env=self.env(),
            cwd=self.root,
            user=PG_USER,
        )

    def _start_monitor(self, timeout: float) -> float:
        started = time.monotonic()
        pgdata = self.root / "monitor"
        self._autoctl(
            "create", "monitor", "--pgdata", str(pgdata), "--pgport", str(self.monitor_port),
            "--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--auth", "trust",
            "--no-ssl", "--ssl-mode", "disable", timeout=timeout,
        )  # fmt: skip
        with open(pgdata / "postgresql.conf", "a") as conf:
            conf.write("\n# chaos topology: fast failover\n")
            conf.writelines(f"{name} = {value}\n" for name, value in self.gucs.items())
        self.monitor = self._spawn_keeper("pg-monitor", "run", "--pgdata", str(pgdata))
        procs.wait_until("monitor answers", lambda: self._monitor_ready(), timeout)
        return time.monotonic() - started

    def _monitor_ready(self) -> bool:
        self.query_monitor("select 1")
        return True

    def _start_node(self, node: PgNode, timeout: float) -> float:
        started = time.monotonic()
        node.keeper = self._spawn_keeper(
            f"pg-{node.name}",
            "create", "postgres", "--pgdata", str(node.pgdata), "--pgport", str(node.port),
            "--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--name", node.name,
            "--dbname", DBNAME, "--auth", "trust", "--no-ssl", "--ssl-mode", "disable",
            "--monitor", self.monitor_uri, "--run",
        )  # fmt: skip
        self.wait_healthy(timeout, expect_nodes=self.nodes.index(node) + 1)
        return time.monotonic() - started

    # -- state --------------------------------------------------------------------------

    def query_monitor(self, sql: str) -> list[list[str]]:
        """Rows of a query on the monitor's pg_auto_failover database."""
        return self.psql(self.monitor_port, "pg_auto_failover", sql)

    def psql(self, port: int, dbname: str, sql: str, timeout: float = 10) -> list[list[str]]:
        """Run SQL through psql on the private socket folder; rows split on '|'."""
        result = procs.run(
            [str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.run_dir),
             "-p", str(port), "-U", PG_USER, "-d", dbname, "-c", sql],
            env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"},
            timeout=timeout,
        )  # fmt: skip
        return [line.split("|") for line in result.stdout.splitlines() if line]

    def states(self) -> dict[str, tuple[str, str]]:
        """name → (reported state, assigned state), from the monitor."""
        rows = self.query_monitor(
            "select nodename, reportedstate, goalstate from pgautofailover.node order by nodeid"
        )
        return {name: (reported, goal) for name, reported, goal in rows}

    def primary(self) -> str | None:
        """The node the monitor has settled as primary (reported = assigned), if any."""
        for name, (reported, goal) in self.states().items():
            if reported == goal and reported in PRIMARY_STATES:
                return name
        return None

    def is_writable(self, name: str) -> bool:
        """Whether the node accepts a read-write session now."""
        rows = self.psql(self.node(name).port, DBNAME, "select not pg_is_in_recovery()", 3)
        return rows == [["t"]]

    def wait_healthy(self, timeout: float, expect_nodes: int | None = None) -> float:
        """Until every node reports its assigned state, one primary and the rest secondaries."""
        expect = expect_nodes or len(self.nodes)

        def settled() -> bool:
            states = self.states()
            if len(states) < expect:
                return False
            if any(reported != goal for reported, goal in states.values()):
                self._nudge_basebackup()
                return False
            roles = sorted(goal for goal, _ in states.values())
            want = ["single"] if expect == 1 else ["primary"] + ["secondary"] * (expect - 1)
            return roles == want

        return procs.wait_until("pg_auto_failover settles", settled, timeout, 0.5)[1]

    def _nudge_basebackup(self) -> None:
        """pg_basebackup waits for a spread checkpoint; ask the primary for an immediate one."""
        primary = next(
            (n for n, (rep, _) in self.states().items() if rep in PRIMARY_STATES),
            None,
        )
        if primary is not None:
            procs.run(
                [str(PG_BIN / "psql"), "-X", "-h", str(self.run_dir), "-p",
                 str(self.node(primary).port), "-U", PG_USER, "-d", DBNAME, "-c", "checkpoint"],
                env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"},
                timeout=10,
                check=False,
            )  # fmt: skip

    # -- faults -------------------------------------------------------------------------

    def kill_primary(self) -> str:
        """SIGKILL the primary's pg_autoctl keeper and its postmaster (and their group)."""
        name = self.primary()
        if name is None:
            raise RuntimeError(f"no settled primary to kill: {self.states()}")
        self.kill_node(name)
        return name

    def kill_node(self, name: str) -> None:
        """SIGKILL one node's keeper, postmaster and their process group; note the time."""
        node = self.node(name)
        postmaster = node.postmaster_pid()
        self.killed_at = time.monotonic()
        if node.keeper is not None:
            procs.kill_pid(node.keeper.pid)
        if postmaster is not None:
            procs.kill_pid(postmaster)
        if node.keeper is not None:
            node.keeper.kill()
            node.keeper.wait(5)
        if postmaster is not None:
            procs.wait_gone(postmaster, 10)

    def wait_for_new_primary(self, old: str, timeout: float = 60) -> float:
        """Seconds from the kill until another node is settled primary and takes writes."""

        def promoted() -> str | None:
            name = self.primary()
            if name is None or name == old or not self.is_writable(name):
                return None
            return name

        procs.wait_until(f"a primary other than {old}", promoted, timeout, 0.2)
        return time.monotonic() - (self.killed_at or time.monotonic())

    def restart_node(self, name: str) -> None:
        """Start a killed node's keeper again: it rejoins (pg_rewind) as a standby."""
        node = self.node(name)
        if node.keeper is not None and node.keeper.running():
            raise RuntimeError(f"{name} is still running")
        procs.reap_orphans()
        self._clear_stale_pidfile(node)
        node.keeper = self._spawn_keeper(f"pg-{name}", "run", "--pgdata", str(node.pgdata))

    @staticmethod
    def _clear_stale_pidfile(node: PgNode) -> None:
        pid = node.postmaster_pid()
        if pid is not None and not procs.alive(pid):
            (node.pgdata / "postmaster.pid").unlink(missing_ok=True)

    # -- stop ---------------------------------------------------------------------------

    def stop(self, grace: float = 5) -> None:
        """Fast shutdown of every postmaster and keeper, then SIGKILL what is left."""
        for node in self.nodes:
            pid = node.postmaster_pid()
            if pid is not None and procs.alive(pid):
                procs.kill_pid(pid, signal.SIGINT)
        monitor_pid = PgNode("monitor", self.monitor_port, self.root / "monitor").postmaster_pid()
        if monitor_pid is not None and procs.alive(monitor_pid):
            procs.kill_pid(monitor_pid, signal.SIGINT)
        for proc in self.processes():
            proc.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes():
            proc.wait(max(0.1, deadline - time.monotonic()))
            proc.kill(signal.SIGKILL)
            proc.wait(2)
        self._kill_postmasters()

    def _kill_postmasters(self) -> None:
        dirs = [node.pgdata for node in self.nodes] + [self.root / "monitor"]
        for pgdata in dirs:
            pid = PgNode("", 0, pgdata).postmaster_pid()
            if pid is not None and procs.alive(pid) and _cmdline_has(pid, str(pgdata)):
                procs.kill_pid(pid)


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pg_bin_ok() -> bool:
    """Whether PostgreSQL 15 and pg_autoctl are installed."""
    return (PG_BIN / "postgres").exists() and any(
        (Path(d) / "pg_autoctl").exists() for d in os.environ.get("PATH", "/usr/bin").split(":")
    )
