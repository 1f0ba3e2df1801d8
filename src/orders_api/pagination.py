"""Signed keyset cursor: the exact (created_at µs, id) of the last row, bound to its tenant.

Layout before base64url: 8-byte big-endian microseconds since the epoch, 16-byte UUID,
16-byte truncated HMAC-SHA256 over (tenant, those 24 bytes). Any change, another tenant
or another secret makes the MAC fail, and the cursor is rejected with 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.db import app_secrets

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BODY = struct.Struct(">q16s")
_MAC_BYTES = 16
_ENCODED_LENGTH = 54  # base64url of 40 bytes, unpadded
CURSOR_SECRET_NAME = "cursor_secret"


class InvalidCursor(ValueError):
    pass


def _mac(secret: bytes, tenant_id: str, body: bytes) -> bytes:
    message = tenant_id.encode() + b"\x00" + body
    return hmac.new(secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(secret: bytes, tenant_id: str, created_at: datetime, order_id: uuid.UUID) -> str:
    delta = created_at.astimezone(UTC) - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    body = _BODY.pack(micros, order_id.bytes)
    return base64.urlsafe_b64encode(body + _mac(secret, tenant_id, body)).rstrip(b"=").decode()


def decode_cursor(secret: bytes, tenant_id: str, cursor: str) -> tuple[datetime, uuid.UUID]:
    if len(cursor) != _ENCODED_LENGTH:
        raise InvalidCursor("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "==")
    except (binascii.Error, ValueError):
        raise InvalidCursor("malformed cursor") from None
    # The decoder skips foreign characters, takes +/ for -_ and ignores the last character's
    # spare bits: only the one canonical spelling of the bytes is a cursor.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != cursor:
        raise InvalidCursor("malformed cursor")
    body, mac = raw[: _BODY.size], raw[_BODY.size :]
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, _mac(secret, tenant_id, body)):
        raise InvalidCursor("cursor is not valid for this tenant")
    micros, id_bytes = _BODY.unpack(body)
    try:
        created_at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise InvalidCursor("malformed cursor") from None
    return created_at, uuid.UUID(bytes=id_bytes)


async def cursor_secret(state: Any) -> bytes:
    """CURSOR_SECRET when configured, else the key the migration generated in app_secrets:
    shared by every worker and machine on the database, and stable across restarts."""
    if state.cursor_secret is None:
        state.cursor_secret = await _load_cursor_secret(state.reader)
    secret: bytes = state.cursor_secret
    return secret


async def _load_cursor_secret(reader: AsyncEngine) -> bytes:
    async with reader.connect() as conn:
        value = await conn.scalar(
            select(app_secrets.c.value).where(app_secrets.c.name == CURSOR_SECRET_NAME)
        )
    if value is None:
        raise RuntimeError("no cursor secret in app_secrets: run `orders-api migrate`")
    return str(value).encode()
