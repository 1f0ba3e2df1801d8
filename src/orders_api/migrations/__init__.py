"""Alembic migrations, shipped inside the package so `orders-api migrate` works from anywhere."""

from __future__ import annotations

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "orders_api:migrations")
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision`; safe to run from several processes at once."""
    command.upgrade(alembic_config(database_url), revision)
