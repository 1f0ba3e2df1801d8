"""Static checks of the deployment files (no Docker engine runs here): the compose file parses,
its order of start is right, and every command the image or compose runs is a real command of
orders-api with real options, and is the one the README documents."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.helpers import PROJECT_ROOT, free_port
from tests.live import BIN, ORDERS_API

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"


def compose_tool() -> list[str]:
    """`docker compose` (plugin) or `docker-compose` (.ci/ensure-tools installs the latter)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("neither `docker compose` nor `docker-compose` is installed")


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


def test_compose_runs_migrations_once_before_the_api_and_the_relay() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "nats", "migrate", "api", "relay"}
    assert services["migrate"]["command"] == ["orders-api", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "relay"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name
    assert services["api"]["command"][:2] == ["orders-api", "serve"]
    assert services["relay"]["command"] == ["orders-api", "relay"]
    assert "-js" in services["nats"]["command"]
    assert services["relay"]["environment"]["NATS_URL"] == "nats://nats:4222"
    for name in ("migrate", "api", "relay"):
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert services[name]["build"] == "."


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
