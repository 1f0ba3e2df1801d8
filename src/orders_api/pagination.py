"""Signed keyset cursor: the exact (created_at µs, id) of the last row, bound to its tenant.

Layout before base64url: 8-byte big-endian microseconds since the epoch, 16-byte UUID,
16-byte truncated HMAC-SHA256 over (tenant, status filter, those 24 bytes). Any change,
another tenant, another filter or another secret makes the MAC fail: 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from datetime import UTC, datetime, timedelta

from orders_api.pool import Pool

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BODY = struct.Struct(">q16s")
_MAC_BYTES = 16
_ENCODED_LENGTH = 54  # base64url of 40 bytes, unpadded
CURSOR_SECRET_NAME = "cursor_secret"


class InvalidCursor(ValueError):
    pass


def _mac(secret: bytes, tenant_id: str, status: str | None, body: bytes) -> bytes:
    scope = tenant_id if status is None else f"{tenant_id}\x00status={status}"
    message = scope.encode() + b"\x00" + body
    return hmac.new(secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(
    secret: bytes,
    tenant_id: str,
    created_at: datetime,
    order_id: uuid.UUID,
    status: str | None = None,
) -> str:
    delta = created_at.astimezone(UTC) - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    body = _BODY.pack(micros, order_id.bytes)
    mac = _mac(secret, tenant_id, status, body)
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()


def decode_cursor(
    secret: bytes, tenant_id: str, cursor: str, status: str | None = None
) -> tuple[datetime, uuid.UUID]:
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
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(
        mac, _mac(secret, tenant_id, status, body)
    ):
        raise InvalidCursor("cursor is not valid for this tenant and status filter")
    micros, id_bytes = _BODY.unpack(body)
    try:
        created_at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise InvalidCursor("malformed cursor") from None
    return created_at, uuid.UUID(bytes=id_bytes)


class CursorSecret:
    """The key that signs cursors: CURSOR_SECRET when configured, else the one the first
    migration generated in app_secrets (shared by every worker and machine on the database,
    stable across restarts).

    The stored one is read on first use and kept, not at start-up: a service started during a
    database outage comes up not ready and answers 503, rather than failing to start.
    """

    def __init__(self, pool: Pool, configured: str = "") -> None:
        self._pool = pool
        self._value = configured.encode() or None

    async def get(self) -> bytes:
        if self._value is None:
            value = await self._pool.fetchval(
                "SELECT value FROM app_secrets WHERE name = $1", CURSOR_SECRET_NAME
            )
            if value is None:
                raise RuntimeError("no cursor secret in app_secrets: run `orders-api migrate`")
            self._value = str(value).encode()
        return self._value
