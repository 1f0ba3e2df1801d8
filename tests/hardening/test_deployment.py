"""Static checks of the deployment files (no Docker engine runs here): the compose file parses,
its order of start is right, and every command the image or compose runs is a real command of
orders-api with real options, and is the one the README documents."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.helpers import PROJECT_ROOT, free_port
from tests.live import BIN, ORDERS_API

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"


def compose_tool() -> list[str]:
    """`docker compose` (plugin) or `docker-compose` (Debian's package of that name)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError(
        "neither `docker compose` nor `docker-compose` is installed: install the Debian "
        "package docker-compose (apt-get install docker-compose)"
    )


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and the build stage, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), arguments
    return [str(part) for part in parsed]


def orders_api_commands() -> list[list[str]]:
    """Every `orders-api …` command the image (CMD) and compose services run."""
    commands = [exec_form(args) for op, args in final_stage() if op == "CMD"]
    for service in compose()["services"].values():
        command = service.get("command")
        if command and command[0] == "orders-api":
            commands.append([str(part) for part in command])
    return commands


def test_docker_compose_config_parses() -> None:
    run = subprocess.run(
        [*compose_tool(), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_compose_runs_the_topology_past_one_machine() -> None:
    """The chaos run's topology (chaos/README.md): a pg_auto_failover monitor and two nodes,
    PgBouncer kept on the primary, 3 NATS servers, 2 API replicas behind HAProxy, 2 relays, and
    the migrations once, on the direct multi-host URL, before the API replicas and the relays."""
    services = compose()["services"]
    assert set(services) == {
        "monitor", "node1", "node2", "pgbouncer-follow", "pgbouncer",
        "nats1", "nats2", "nats3", "migrate", "api1", "api2", "haproxy", "relay1", "relay2",
    }  # fmt: skip
    assert services["monitor"]["command"][:3] == ["pg_autoctl", "create", "monitor"]
    assert services["migrate"]["command"] == ["orders-api", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for node in ("node1", "node2"):
        assert services[node]["command"][:3] == ["pg_autoctl", "create", "postgres"]
        assert services["migrate"]["depends_on"][node]["condition"] == "service_healthy"
    direct = services["migrate"]["environment"]["DATABASE_URL"]
    assert direct.startswith("postgresql://")
    assert "@node1:5432,node2:5432/" in direct
    assert "target_session_attrs=read-write" in direct
    nats_urls = "nats://nats1:4222,nats://nats2:4222,nats://nats3:4222"
    for name in ("api1", "api2", "relay1", "relay2"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
    for name in ("api1", "api2"):
        assert services[name]["command"][:2] == ["orders-api", "serve"]
        assert services[name]["environment"]["DATABASE_URL"].endswith("?pgbouncer=true")
    for name in ("relay1", "relay2"):
        assert services[name]["command"] == ["orders-api", "relay"]
        assert services[name]["environment"]["DATABASE_URL"] == direct  # LISTEN needs a session
        assert services[name]["environment"]["NATS_URL"] == nats_urls
        assert services[name]["environment"]["RELAY_STREAM_REPLICAS"] == "3"
    for name in ("nats1", "nats2", "nats3"):
        command = services[name]["command"]
        assert "--jetstream" in command
        assert "--cluster_name" in command
    for name in ("migrate", "api1", "api2", "relay1", "relay2"):
        assert services[name]["build"] == "."
    haproxy = (PROJECT_ROOT / "chaos" / "compose" / "haproxy.cfg").read_text()
    assert "server api1 api1:8000 check" in haproxy
    assert "server api2 api2:8000 check" in haproxy


def test_compose_mounts_only_files_of_the_repository_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (PROJECT_ROOT / source).exists(), (name, volume)


def test_the_compose_haproxy_config_is_valid(tmp_path: Path) -> None:
    """`haproxy -c` on chaos/compose/haproxy.cfg (its error files mapped to the repository's;
    the replicas' names resolve only inside the compose network)."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "haproxy is not installed: apt-get install haproxy"
    errors = PROJECT_ROOT / "chaos" / "compose" / "errors"
    config = (PROJECT_ROOT / "chaos" / "compose" / "haproxy.cfg").read_text()
    checked = tmp_path / "haproxy.cfg"
    checked.write_text(config.replace("/usr/local/etc/haproxy/errors", str(errors)))
    run = subprocess.run(
        [haproxy, "-c", "-f", str(checked)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_is_slim_locked_non_root_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert all(args.split()[0] == "python:3.11-slim" for args in froms), froms
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "uv sync --locked --no-dev" in runs
    final = final_stage()
    users = [args for op, args in final if op == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1] not in ("root", "0")
    healthcheck = [args for op, args in final if op == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    assert "/healthz" in healthcheck[0]
    assert exec_form(next(args for op, args in final if op == "CMD")) == [
        "orders-api", "serve", "--host", "0.0.0.0", "--workers", "2",
    ]  # fmt: skip


def test_dockerignore_keeps_secrets_and_bulk_out_but_not_the_sources() -> None:
    ignored = {
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".data", "tests"} <= ignored
    copied = {"pyproject.toml", "uv.lock", "README.md", "src"}
    assert not copied & ignored


def _subcommands() -> set[str]:
    usage = subprocess.run([ORDERS_API, "--help"], capture_output=True, text=True, check=True)
    match = re.search(r"\{([a-z,]+)\}", usage.stdout)
    assert match, usage.stdout
    return set(match.group(1).split(","))


@pytest.mark.parametrize("command", orders_api_commands(), ids=shlex.join)
def test_every_command_is_a_real_orders_api_command(command: list[str]) -> None:
    assert command[0] == "orders-api"
    subcommand = command[1]
    assert subcommand in _subcommands()
    help_text = subprocess.run(
        [ORDERS_API, subcommand, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (part for part in command[2:] if part.startswith("--")):
        assert re.search(rf"(^|\s|\[){re.escape(option)}\b", help_text), (option, help_text)


@pytest.mark.parametrize("command", orders_api_commands(), ids=shlex.join)
def test_the_readme_documents_every_command(command: list[str]) -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert shlex.join(command) in readme, shlex.join(command)


def healthcheck_command() -> list[str]:
    args = next(args for op, args in final_stage() if op == "HEALTHCHECK")
    return exec_form(args.split(" CMD ", 1)[1])


def test_the_healthcheck_command_fails_without_a_server() -> None:
    command = healthcheck_command()
    assert command[0] == "python"
    run = subprocess.run(
        [str(BIN / "python"), *command[1:]],
        env={"PORT": str(free_port())},
        capture_output=True,
        timeout=30,
    )
    assert run.returncode != 0
