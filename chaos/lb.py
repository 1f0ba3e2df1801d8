"""HAProxy on one private port, round-robin over HTTP backends checked on /readyz."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
from pathlib import Path

from chaos import procs

HAPROXY = "/usr/sbin/haproxy"

# HAProxy's own answers, in the API's error shape: 503 when no instance is ready (all failed
# /readyz, e.g. during a database failover), 502 when an instance died mid-request (unknown
# outcome: retry with the same Idempotency-Key), 504 when one did not answer in time.
ERRORS = {
    502: ("Bad Gateway", "bad_gateway", "the API instance closed the connection"),
    503: ("Service Unavailable", "unavailable", "no API instance is ready"),
    504: ("Gateway Timeout", "gateway_timeout", "the API instance did not answer in time"),
}


class HaProxy:
    """One haproxy process in the foreground with an admin socket for backend states."""

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        port: int,
        backend_ports: list[int],
        tag: str,
        health_path: str = "/readyz",
    ) -> None:
        self.root = root
        self.log_dir = log_dir
        self.port = port
        self.backend_ports = backend_ports
        self.tag = tag
        self.health_path = health_path
        self.proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cfg_path(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def socket_path(self) -> Path:
        return self.root / "admin.sock"

    def _write_errorfiles(self) -> str:
        lines = ""
        for status, (reason, code, message) in ERRORS.items():
            body = json.dumps({"code": code, "message": message}).encode()
            head = (
                f"HTTP/1.1 {status} {reason}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Retry-After: 1\r\n" if status == 503 else "")
                + "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            path = self.root / f"{status}.http"
            path.write_bytes(head.encode() + body)
            lines += f"    errorfile {status} {path}\n"
        return lines

    def write_config(self) -> None:
        """Round-robin, /readyz checks every second, redispatch and retries on connect failure.

        retry-on stays at HAProxy's default (conn-failure): a request that reached an instance
        that then died is not replayed by the balancer (a POST may have been committed); the
        client retries with its Idempotency-Key instead.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        servers = "".join(
            f"    server api{i} 127.0.0.1:{port} check\n"
            for i, port in enumerate(self.backend_ports, 1)
        )
        self.cfg_path.write_text(
            "global\n"
            "    log stdout format raw local0 info\n"
            "    maxconn 4000\n"
            f"    stats socket {self.socket_path} mode 600 level admin\n"
            "\ndefaults\n"
            "    mode http\n"
            "    log global\n"
            "    option httplog\n"
            "    option dontlognull\n"
            "    option redispatch 1\n"
            "    retries 3\n"
            "    timeout connect 1s\n"
            "    timeout client 30s\n"
            "    timeout server 15s\n"
            "    timeout http-request 10s\n"
            "    timeout queue 5s\n"
            "    timeout check 1s\n"
            f"{self._write_errorfiles()}"
            "\nfrontend api\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend apis\n"
            "\nbackend apis\n"
            "    balance roundrobin\n"
            f"    option httpchk GET {self.health_path}\n"
            "    http-check expect status 200\n"
            "    default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 1\n"
            f"{servers}"
        )

    def start(self, timeout: float = 10) -> float:
        """Check the config, start haproxy; seconds until it listens."""
        self.write_config()
        procs.run([HAPROXY, "-c", "-q", "-f", str(self.cfg_path)], timeout=10)
        self.proc = procs.spawn(
            "haproxy",
            [HAPROXY, "-db", "-f", str(self.cfg_path)],
            log_dir=self.log_dir,
            env={"PATH": "/usr/bin:/bin", procs.TAG: self.tag},
            cwd=self.root,
        )
        return procs.wait_until("haproxy listens", self._listening, timeout, 0.1)[1]

    def _listening(self) -> bool:
        if self.proc is not None and not self.proc.running():
            raise RuntimeError(f"haproxy exited:\n{self.proc.log_tail()}")
        return procs.port_open(self.port)

    def admin(self, command: str, timeout: float = 2) -> str:
        """One command on the admin socket (e.g. "show stat")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def backend_status(self) -> dict[str, str]:
        """Server name → UP / DOWN / … as HAProxy's health checks see them."""
        text = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == "apis" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_backends_up(self, count: int, timeout: float = 30) -> float:
        """Until at least `count` backends are UP."""

        def enough() -> bool:
            return sum(s.startswith("UP") for s in self.backend_status().values()) >= count

        return procs.wait_until(f"{count} backends UP", enough, timeout, 0.2)[1]

    def stop(self, grace: float = 3) -> None:
        """SIGTERM (hard stop), then SIGKILL."""
        if self.proc is None:
            return
        self.proc.kill(signal.SIGTERM)
        if not self.proc.wait(grace):
            self.proc.kill(signal.SIGKILL)
            self.proc.wait(2)
