"""The chaos run's load through HAProxy: same-key creates, keyed If-Match confirms and closes,
a paging scan over one tenant while inserts land in it. Every answer is recorded.

An answer is *definitive* when it tells what happened (2xx, or a 4xx other than 409
`request_in_progress`); a time-out, a transport error, 500, 502, 503, 504 or
`request_in_progress` is an *unknown outcome*, retried with the same Idempotency-Key (the same
cursor for a page) until a definitive answer or the deadline. Keys, totals and the choice of
which orders are confirmed and closed come from the seed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

UNKNOWN_STATUSES = frozenset({500, 502, 503, 504})
WRITE_OPS = ("create", "confirm", "close")
EXPECTED = {"create": (200, 201), "confirm": (200,), "close": (200,), "list": (200,)}
FLOW_TENANTS = ("chaos-t1", "chaos-t2", "chaos-t3")
PAGE_TENANT = "chaos-page"
CREATE_COPIES = 3  # concurrent copies of each create (same key, same body)
CHANGE_COPIES = 2  # concurrent copies of each confirm and close (same key, same request)
CONFIRM_SHARE = 0.85
CLOSE_SHARE = 0.8  # of the confirmed ones
PAGE_SIZE = 20


@dataclass(frozen=True, slots=True)
class Answer:
    """A definitive answer: status, JSON body, the headers we check, attempts it took."""

    status: int
    body: Any
    etag: str | None
    replayed: bool
    attempts: int


@dataclass
class OrderRecord:
    """One order's life as the client saw it."""

    tenant: str
    key: str
    plan: str  # draft | confirmed | closed: how far the flow takes it
    total_cents: int
    creates: list[Answer | None] = field(default_factory=list)  # None: unresolved copy
    confirms: list[Answer | None] = field(default_factory=list)
    closes: list[Answer | None] = field(default_factory=list)

    @property
    def order_ids(self) -> set[str]:
        """Every id a definitive create answer named (one, if idempotency holds)."""
        return {
            str(a.body.get("id"))
            for a in self.creates
            if a is not None and a.status in (200, 201) and isinstance(a.body, dict)
        }

    def acked(self, op: str) -> list[Answer]:
        answers = {"create": self.creates, "confirm": self.confirms, "close": self.closes}[op]
        return [a for a in answers if a is not None and a.status in EXPECTED[op]]


@dataclass
class ScanRecord:
    """One paging scan: the rows committed before it started, and what its pages returned."""

    started_s: float
    snapshot: set[str]
    seen: list[tuple[str, str]] = field(default_factory=list)  # (createdAt, id) in page order
    pages: int = 0
    ended_s: float = 0.0
    complete: bool = False


@dataclass
class Recorder:
    """Counts of every attempt's outcome, retries, and the timeline of writes."""

    t0: float
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    # (started_s, ended_s, op, "ok" | "unknown" | "definitive") of every write attempt
    writes: list[tuple[float, float, str, str]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    server_errors: list[dict[str, Any]] = field(default_factory=list)  # every 500, in full

    def now(self) -> float:
        return time.monotonic() - self.t0


def _backoff(attempt: int, rng: random.Random) -> float:
    """Exponential from 0.1 s, capped at 2 s, equal jitter."""
    capped = min(2.0, 0.1 * 2.0 ** min(attempt - 1, 5))
    return capped / 2 + rng.random() * capped / 2


class Load:
    """The load: `preload()` the paging tenant, then `run()` until `load_end_s`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        dsn: str,
        seed: int,
        flows: int,
        recorder: Recorder,
        load_end_s: float,
        deadline_s: float,
    ) -> None:
        self.client = client
        self.dsn = dsn
        self.seed = seed
        self.flows = flows
        self.rec = recorder
        self.load_end_s = load_end_s
        self.deadline_s = deadline_s
        self.orders: list[OrderRecord] = []
        self.scans: list[ScanRecord] = []

    # -- one request until a definitive answer --------------------------------------------

    async def request(
        self,
        op: str,
        method: str,
        path: str,
        tenant: str,
        rng: random.Random,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Answer | None:
        """Send until a definitive answer (None: the deadline passed first)."""
        sent = {"X-Tenant-Id": tenant, **(headers or {})}
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1:
                self.rec.retries[op] += 1
            started = self.rec.now()
            status: int | None = None
            outcome: str
            body: Any = None
            etag = replayed = None
            try:
                response = await self.client.request(
                    method, path, headers=sent, json=json_body, params=params
                )
                status = response.status_code
                outcome = str(status)
                etag = response.headers.get("etag")
                replayed = response.headers.get("idempotent-replayed")
                try:
                    body = response.json()
                except ValueError:
                    body = response.text[:200]
            except httpx.TimeoutException:
                outcome = "timeout"
            except httpx.TransportError as exc:
                outcome = f"transport:{type(exc).__name__}"
            ended = self.rec.now()
            self.rec.counts[op, outcome] += 1
            unknown = status is None or status in UNKNOWN_STATUSES or _in_progress(status, body)
            if status == 500:
                self.rec.server_errors.append(_evidence(op, method, path, sent, json_body,
                                                        status, body, started))  # fmt: skip
            if op in WRITE_OPS:
                kind = "unknown" if unknown else "ok" if 200 <= (status or 0) < 300 else "def"
                self.rec.writes.append((started, ended, op, kind))
            if not unknown:
                assert status is not None
                if status not in EXPECTED[op]:
                    self.rec.unexpected.append(_evidence(op, method, path, sent, json_body,
                                                         status, body, started))  # fmt: skip
                return Answer(status, body, etag, replayed == "true", attempt)
            if ended > self.deadline_s:
                self.rec.unresolved.append(
                    {**_evidence(op, method, path, sent, json_body, status, body, started),
                     "outcome": outcome, "attempts": attempt}
                )  # fmt: skip
                return None
            await asyncio.sleep(_backoff(attempt, rng))

    # -- order flows ----------------------------------------------------------------------

    async def order_flow(self, flow: int) -> None:
        """Orders one after the other until load_end: create, maybe confirm, maybe close."""
        n = 0
        while self.rec.now() < self.load_end_s:
            n += 1
            rng = random.Random(f"{self.seed}/flow/{flow}/{n}")
            plan = "draft"
            if rng.random() < CONFIRM_SHARE:
                plan = "closed" if rng.random() < CLOSE_SHARE else "confirmed"
            record = OrderRecord(
                tenant=FLOW_TENANTS[flow % len(FLOW_TENANTS)],
                key=f"chaos-{self.seed}-{flow}-{n}",
                plan=plan,
                total_cents=rng.randrange(0, 1_000_000),
            )
            self.orders.append(record)
            await self.lifecycle(record, rng)

    async def lifecycle(self, record: OrderRecord, rng: random.Random) -> None:
        key, tenant = record.key, record.tenant
        record.creates = await self._copies(
            CREATE_COPIES,
            rng,
            lambda r: self.request(
                "create", "POST", "/orders", tenant, r, {"Idempotency-Key": key}, {}
            ),
        )
        ids = record.order_ids
        if record.plan == "draft" or len(ids) != 1:
            return
        order_id = next(iter(ids))
        record.confirms = await self._copies(
            CHANGE_COPIES,
            rng,
            lambda r: self.request(
                "confirm", "PATCH", f"/orders/{order_id}/confirm", tenant, r,
                {"Idempotency-Key": f"{key}:confirm", "If-Match": '"1"'},
                {"totalCents": record.total_cents},
            ),
        )  # fmt: skip
        if record.plan != "closed" or not record.acked("confirm"):
            return
        record.closes = await self._copies(
            CHANGE_COPIES,
            rng,
            lambda r: self.request(
                "close", "POST", f"/orders/{order_id}/close", tenant, r,
                {"Idempotency-Key": f"{key}:close", "If-Match": '"2"'},
            ),
        )  # fmt: skip

    @staticmethod
    async def _copies(count: int, rng: random.Random, send: Any) -> list[Answer | None]:
        """`count` concurrent copies of one request, each with its own jitter."""
        seeds = [rng.random() for _ in range(count)]
        return list(await asyncio.gather(*(send(random.Random(s)) for s in seeds)))

    # -- the paging tenant ----------------------------------------------------------------

    async def preload(self, count: int, concurrency: int = 8) -> None:
        """`count` orders in the paging tenant before the load (one copy each)."""
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                await self._page_create(f"chaos-{self.seed}-page-pre-{i}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _page_create(self, key: str) -> None:
        rng = random.Random(f"{self.seed}/{key}")
        record = OrderRecord(PAGE_TENANT, key, "draft", 0)
        self.orders.append(record)
        record.creates = [
            await self.request(
                "create", "POST", "/orders", PAGE_TENANT, rng, {"Idempotency-Key": key}, {}
            )
        ]

    async def page_inserter(self, interval: float = 0.1) -> None:
        """New orders in the paging tenant while the scans run."""
        n = 0
        while self.rec.now() < self.load_end_s:
            n += 1
            await self._page_create(f"chaos-{self.seed}-page-ins-{n}")
            await asyncio.sleep(interval)

    async def scanner(self, pause: float = 0.05) -> None:
        """Scan after scan over the paging tenant, each compared against a fresh snapshot."""
        n = 0
        while self.rec.now() < self.load_end_s:
            n += 1
            rng = random.Random(f"{self.seed}/scan/{n}")
            snapshot = await self._snapshot()
            if snapshot is None:
                return
            scan = ScanRecord(self.rec.now(), snapshot)
            self.scans.append(scan)
            cursor: str | None = None
            while True:
                params = {"limit": str(PAGE_SIZE)}
                if cursor is not None:
                    params["cursor"] = cursor
                answer = await self.request("list", "GET", "/orders", PAGE_TENANT, rng,
                                            params=params)  # fmt: skip
                if answer is None or answer.status != 200 or not isinstance(answer.body, dict):
                    break
                scan.pages += 1
                scan.seen.extend((i["createdAt"], i["id"]) for i in answer.body["items"])
                cursor = answer.body.get("nextCursor")
                if cursor is None:
                    scan.complete = True
                    break
                await asyncio.sleep(pause)
            scan.ended_s = self.rec.now()

    async def _snapshot(self) -> set[str] | None:
        """Ids of the paging tenant's committed rows, straight from the primary (retried)."""
        while self.rec.now() < self.deadline_s:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=2)
                try:
                    rows = await conn.fetch(
                        "SELECT id::text FROM orders WHERE tenant_id = $1", PAGE_TENANT
                    )
                finally:
                    await conn.close()
                return {r[0] for r in rows}
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                await asyncio.sleep(0.3)
        return None

    async def run(self) -> None:
        """Every flow, the inserter and the scanner, until load_end (and their retries)."""
        await asyncio.gather(
            *(self.order_flow(i) for i in range(self.flows)),
            self.page_inserter(),
            self.scanner(),
        )


def _in_progress(status: int | None, body: Any) -> bool:
    """409 request_in_progress: another copy holds the key; come back."""
    return (
        status == 409
        and isinstance(body, dict)
        and (body.get("details") or {}).get("reason") == "request_in_progress"
    )


def _evidence(
    op: str,
    method: str,
    path: str,
    headers: dict[str, str],
    json_body: Any,
    status: int | None,
    body: Any,
    at: float,
) -> dict[str, Any]:
    return {
        "op": op,
        "request": f"{method} {path}",
        "headers": headers,
        "body": json_body,
        "status": status,
        "answer": body,
        "at_s": round(at, 3),
    }
