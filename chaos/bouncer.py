"""PgBouncer in transaction pooling mode on a private port, run as the postgres user."""

from __future__ import annotations

import signal
from pathlib import Path

from chaos import procs

PGBOUNCER = "/usr/sbin/pgbouncer"
USER = "postgres"

# What clients may send at startup that PgBouncer 1.18 does not track. asyncpg sends only
# user, database, client_encoding and its server_settings; PgBouncer tracks client_encoding,
# DateStyle, TimeZone, standard_conforming_strings and application_name itself. psql and
# JDBC send extra_float_digits. statement_timeout / lock_timeout /
# idle_in_transaction_session_timeout are deliberately *not* ignored: a client that sends them
# would believe they apply, so it gets "unsupported startup parameter" instead (set them on
# the role or database, or with SET LOCAL, behind transaction pooling).
IGNORE_STARTUP_PARAMETERS = "extra_float_digits"


class PgBouncer:
    """One pgbouncer process with its own ini, user list, socket folder and log."""

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        port: int,
        tag: str,
        *,
        pool_size: int = 20,
        ignore_startup_parameters: str = IGNORE_STARTUP_PARAMETERS,
    ) -> None:
        self.root = root
        self.log_dir = log_dir
        self.port = port
        self.tag = tag
        self.pool_size = pool_size
        self.ignore_startup_parameters = ignore_startup_parameters
        self.target: tuple[str, int, str] | None = None
        self.proc: procs.Proc | None = None

    @property
    def ini_path(self) -> Path:
        return self.root / "pgbouncer.ini"

    def dsn(self, dbname: str = "orders") -> str:
        """Where clients connect (add ?pgbouncer=true for orders-api)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def write_config(self, host: str, port: int, dbname: str) -> None:
        """The ini for one upstream server; trust auth, transaction pooling."""
        self.target = (host, port, dbname)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "userlist.txt").write_text(f'"{USER}" ""\n')
        self.ini_path.write_text(
            "[databases]\n"
            f"{dbname} = host={host} port={port} dbname={dbname}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            f"admin_users = {USER}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\n"
            f"ignore_startup_parameters = {self.ignore_startup_parameters}\n"
            "server_connect_timeout = 2\n"
            "server_login_retry = 1\n"
            "query_wait_timeout = 10\n"
            "server_check_delay = 1\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        procs.chown_tree(self.root, USER)

    def start(self, host: str, port: int, dbname: str = "orders", timeout: float = 15) -> float:
        """Write the ini and start pgbouncer in the foreground; seconds until it listens."""
        self.write_config(host, port, dbname)
        self.proc = procs.spawn(
            "pgbouncer",
            [PGBOUNCER, str(self.ini_path)],
            log_dir=self.log_dir,
            env={"PATH": "/usr/bin:/bin", procs.TAG: self.tag},
            cwd=self.root,
            user=USER,
        )
        return procs.wait_until("pgbouncer listens", self._listening, timeout, 0.1)[1]

    def _listening(self) -> bool:
        if self.proc is not None and not self.proc.running():
            raise RuntimeError(f"pgbouncer exited:\n{self.proc.log_tail()}")
        return procs.port_open(self.port)

    def repoint(self, host: str, port: int) -> None:
        """Point at another server (after a failover): rewrite the ini and reload (SIGHUP).

        PgBouncer closes server connections whose database's connect string changed.
        """
        if self.target is None or self.proc is None:
            raise RuntimeError("pgbouncer is not started")
        self.write_config(host, port, self.target[2])
        self.proc.kill(signal.SIGHUP)

    def stop(self, grace: float = 3) -> None:
        """SIGTERM (immediate shutdown), then SIGKILL."""
        if self.proc is None:
            return
        self.proc.kill(signal.SIGTERM)
        if not self.proc.wait(grace):
            self.proc.kill(signal.SIGKILL)
            self.proc.wait(2)
