"""pgbench scripts made from the API's own statements (orders_api.orders.store), so the ceiling
runs exactly the SQL a request runs, with pgbench supplying the parameters."""

from __future__ import annotations

import re
from pathlib import Path

from orders_api.orders import store

# What pgbench puts where the API binds a parameter. The API's clock and uuid4 become
# now() and gen_random_uuid(); everything else is bound as a parameter (-M prepared).
CREATE_PARAMETERS = {
    1: ":tenant",  # one of 16 tenants, like create.lua
    2: ":key",  # a random 63-bit number: unique per transaction
    3: ":hash",
    4: ":response",
    5: "now()",
    6: "gen_random_uuid()",
}
LIST_PARAMETERS = {1: ":tenant", 2: ":limit"}

# The response document the API stores with the key (same size and shape).
RESPONSE = (
    '{"id":"b964c070-775c-447a-aa01-9a7068351b01","tenantId":"1000","status":"draft",'
    '"version":1,"createdAt":"2026-11-27T10:14:54.804761Z"}'
)
ISO = store.ISO_FORMAT.strip("'")
REQUEST_HASH = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def _bind(sql: str, parameters: dict[int, str]) -> str:
    # pgbench reads every ":name" as a variable, also inside quotes: the timestamp format
    # (HH24:MI:SS) is bound as the variable :iso, with the same text.
    sql = sql.replace(store.ISO_FORMAT, ":iso")
    return re.sub(r"\$(\d+)", lambda m: parameters[int(m.group(1))], sql.strip())


def create_script(directory: Path) -> tuple[Path, dict[str, str]]:
    path = directory / "ceiling-create.sql"
    path.write_text(
        "-- POST /orders, first create: orders_api.orders.store.CLAIM_KEY_AND_CREATE\n"
        "\\set tenant random(1000, 1015)\n"
        "\\set key random(1, 9223372036854775806)\n"
        f"{_bind(store.CLAIM_KEY_AND_CREATE, CREATE_PARAMETERS)};\n"
    )
    return path, {"hash": REQUEST_HASH, "response": RESPONSE}


def list_script(directory: Path, tenant: str, limit: int) -> tuple[Path, dict[str, str]]:
    path = directory / "ceiling-list.sql"
    path.write_text(
        "-- GET /orders, first page: orders_api.orders.store.LIST_FIRST_PAGE\n"
        f"{_bind(store.LIST_FIRST_PAGE, LIST_PARAMETERS)};\n"
    )
    return path, {"tenant": tenant, "limit": str(limit + 1), "iso": ISO}
