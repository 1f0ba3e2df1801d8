"""What the chaos run checks after the drain, from PostgreSQL (direct) and JetStream (nats-py).

Each check returns {"ok": bool, ...figures, "examples": [...]} (examples: at most 10 offenders).
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chaos.load import FLOW_TENANTS, PAGE_TENANT, Load, Recorder

VERSION_OF = {"draft": 1, "confirmed": 2, "closed": 3}
EXAMPLES = 10


@dataclass
class DbState:
    orders: dict[str, dict[str, Any]]  # id -> row
    outbox: list[dict[str, Any]]
    keys: dict[tuple[str, str], dict[str, Any]]  # (tenant, key) -> row


@dataclass
class StreamState:
    messages: int  # as the stream reports its state
    num_replicas: int
    read: list[dict[str, Any]]  # seq, msg_id, subject, order_id, payload


async def read_db(dsn: str) -> DbState:
    tenants = [*FLOW_TENANTS, PAGE_TENANT]
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        orders = await conn.fetch(
            "SELECT id::text, tenant_id, status, version, total_cents, created_at, updated_at "
            "FROM orders WHERE tenant_id = ANY($1::text[])",
            tenants,
        )
        outbox = await conn.fetch(
            "SELECT id::text, event_type, order_id::text, tenant_id, payload::text AS payload, "
            "created_at, published_at, dead_at, attempts FROM outbox"
        )
        keys = await conn.fetch(
            "SELECT tenant_id, key, status_code, response_json->>'id' AS order_id "
            "FROM idempotency_keys WHERE tenant_id = ANY($1::text[])",
            tenants,
        )
    finally:
        await conn.close()
    return DbState(
        {r["id"]: dict(r) for r in orders},
        [{**dict(r), "payload": json.loads(r["payload"])} for r in outbox],
        {(r["tenant_id"], r["key"]): dict(r) for r in keys},
    )


async def outbox_progress(dsn: str) -> dict[str, int]:
    """Rows in the outbox: total, pending (neither published nor dead), dead."""
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS total, "
            "count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending, "
            "count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead FROM outbox"
        )
    finally:
        await conn.close()
    return {k: int(row[k]) for k in ("total", "pending", "dead")}


async def _ignore(_exc: Exception) -> None:
    return None


async def stream_count(urls: str, stream: str) -> int:
    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, error_cb=_ignore)
    try:
        info = await nc.jetstream(timeout=5).stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def read_stream(urls: str, stream: str) -> StreamState:
    """Every message of the stream, through an ephemeral pull consumer (no acks)."""
    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, error_cb=_ignore)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        total = int(info.state.messages)
        subjects = info.config.subjects or [">"]
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60,
        )
        sub = await js.pull_subscribe(subjects[0], stream=stream, config=config)
        read: list[dict[str, Any]] = []
        empty = 0
        while len(read) < total and empty < 3:
            try:
                batch = await sub.fetch(batch=500, timeout=2)
            except TimeoutError:
                empty += 1
                continue
            for msg in batch:
                headers = msg.headers or {}
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    payload = None
                read.append(
                    {
                        "seq": msg.metadata.sequence.stream,
                        "msg_id": headers.get("Nats-Msg-Id"),
                        "order_id": headers.get("Order-Id"),
                        "subject": msg.subject,
                        "payload": payload,
                    }
                )
        await sub.unsubscribe()
        return StreamState(total, int(info.config.num_replicas or 1), read)
    finally:
        await nc.close()


# -- checks ------------------------------------------------------------------------------


def _result(ok: bool, examples: Iterable[Any] = (), **figures: Any) -> dict[str, Any]:
    listed = list(examples)[:EXAMPLES]
    return {"ok": ok, **figures, **({"examples": listed} if listed else {})}


def check_acknowledged_writes(load: Load, db: DbState) -> dict[str, Any]:
    """create 201/200 -> the order exists; confirm/close 200 -> version >= acked, status fits."""
    bad: list[dict[str, Any]] = []
    counted: Counter[str] = Counter()
    for record in load.orders:
        for answer in record.acked("create"):
            counted["create"] += 1
            row = db.orders.get(str(answer.body.get("id")))
            if row is None or row["tenant_id"] != record.tenant:
                bad.append({"key": record.key, "op": "create", "answer": answer.body, "row": row})
        ids = record.order_ids
        if len(ids) != 1:
            continue
        row = db.orders.get(next(iter(ids)))
        for op, status in (("confirm", "confirmed"), ("close", "closed")):
            for answer in record.acked(op):
                counted[op] += 1
                acked_version = int(answer.body.get("version", 0))
                fine = (
                    row is not None
                    and row["version"] >= acked_version
                    and answer.body.get("status") == status
                    and answer.etag == f'"{acked_version}"'
                    and (
                        row["status"] == "closed"
                        if op == "close"
                        else row["status"] in ("confirmed", "closed")
                    )
                    and (op == "close" or row["total_cents"] == record.total_cents)
                )
                if not fine:
                    bad.append({"key": record.key, "op": op, "answer": answer.body,
                                "etag": answer.etag, "row": _plain(row)})  # fmt: skip
    return _result(not bad, bad, acknowledged=dict(counted), violations=len(bad))


def check_one_order_per_key(load: Load, db: DbState) -> dict[str, Any]:
    """Every answer for a key named one id; the database holds exactly the acked orders."""
    split = [
        {"key": r.key, "ids": sorted(r.order_ids)} for r in load.orders if len(r.order_ids) > 1
    ]
    acked_ids = {i for r in load.orders for i in r.order_ids}
    orphans = sorted(set(db.orders) - acked_ids)  # a row no definitive answer named
    key_mismatch = []
    for r in load.orders:
        stored = db.keys.get((r.tenant, r.key))
        if len(r.order_ids) == 1 and (stored is None or stored["order_id"] not in r.order_ids):
            key_mismatch.append({"key": r.key, "ids": sorted(r.order_ids), "stored": stored})
    retried = sum(1 for r in load.orders for a in r.creates if a is not None and a.attempts > 1)
    # Every copy and retry of one key got the identical answer, and at most one of them was
    # the fresh one (201 for a create, 200 without Idempotent-Replayed for a change).
    differing: list[dict[str, Any]] = []
    applied_twice: list[dict[str, Any]] = []
    for r in load.orders:
        for op in ("create", "confirm", "close"):
            acked = r.acked(op)
            if len({json.dumps(a.body, sort_keys=True) for a in acked}) > 1:
                differing.append({"key": r.key, "op": op, "answers": [a.body for a in acked]})
            fresh = [a for a in acked if (a.status == 201 if op == "create" else not a.replayed)]
            mislabelled = op == "create" and any(a.replayed != (a.status == 200) for a in acked)
            if len(fresh) > 1 or mislabelled:
                answers = [{"status": a.status, "replayed": a.replayed} for a in acked]
                applied_twice.append({"key": r.key, "op": op, "answers": answers})
    return _result(
        not split and not orphans and not key_mismatch and not differing and not applied_twice,
        [
            *split,
            *differing,
            *applied_twice,
            *({"orphan_order": o, "row": _plain(db.orders[o])} for o in orphans),
            *key_mismatch,
        ],
        keys=len(load.orders),
        create_copies=sum(len(r.creates) for r in load.orders),
        copies_that_retried=retried,
        orders_in_db=len(db.orders),
        keys_with_several_ids=len(split),
        orders_no_answer_named=len(orphans),
        key_rows_not_matching=len(key_mismatch),
        keys_with_differing_answers=len(differing),
        keys_applied_twice=len(applied_twice),
    )


def check_outbox_rows(db: DbState) -> dict[str, Any]:
    """Exactly one orders.closed row per closed order, none for any other order."""
    per_order = Counter(row["order_id"] for row in db.outbox)
    closed = {i for i, row in db.orders.items() if row["status"] == "closed"}
    bad = [
        {
            "order": i,
            "status": db.orders[i]["status"] if i in db.orders else None,
            "rows": per_order.get(i, 0),
        }
        for i in sorted(set(per_order) | closed)
        if per_order.get(i, 0) != (1 if i in closed else 0)
    ]
    wrong_type = [r["id"] for r in db.outbox if r["event_type"] != "orders.closed"]
    return _result(
        not bad and not wrong_type,
        [*bad, *({"wrong_event_type": i} for i in wrong_type)],
        closed_orders=len(closed),
        outbox_rows=len(db.outbox),
        violations=len(bad) + len(wrong_type),
    )


def check_outbox_equals_stream(db: DbState, stream: StreamState) -> dict[str, Any]:
    """Outbox ids == the stream's Nats-Msg-Ids: no duplicate, nothing missing, nothing extra."""
    outbox_ids = {r["id"] for r in db.outbox}
    msg_ids = [m["msg_id"] for m in stream.read]
    counts = Counter(msg_ids)
    duplicates = sorted(str(i) for i, n in counts.items() if n > 1)
    missing = sorted(outbox_ids - set(counts))
    extra = sorted(str(i) for i in set(counts) - outbox_ids)
    unpublished = [r["id"] for r in db.outbox if r["published_at"] is None]
    dead = [r["id"] for r in db.outbox if r["dead_at"] is not None]
    order_of = {r["id"]: r["order_id"] for r in db.outbox}
    mismatched = [
        m
        for m in stream.read
        if m["msg_id"] in order_of
        and not (
            m["order_id"] == order_of[m["msg_id"]]
            and isinstance(m["payload"], dict)
            and m["payload"].get("orderId") == order_of[m["msg_id"]]
        )
    ]
    ok = (
        not duplicates
        and not missing
        and not extra
        and not unpublished
        and not dead
        and not mismatched
        and len(stream.read) == stream.messages
    )
    return _result(
        ok,
        [
            *({"duplicate": i} for i in duplicates),
            *({"missing": i} for i in missing),
            *({"extra": i} for i in extra),
            *({"unpublished": i} for i in unpublished),
            *({"dead": i} for i in dead),
            *({"payload_mismatch": m} for m in mismatched),
        ],
        outbox_ids=len(outbox_ids),
        stream_messages=stream.messages,
        messages_read=len(stream.read),
        duplicates=len(duplicates),
        missing=len(missing),
        extra=len(extra),
        unpublished=len(unpublished),
        dead=len(dead),
        payload_mismatch=len(mismatched),
        stream_replicas=stream.num_replicas,
        outbox_rows_by_attempts=dict(sorted(Counter(r["attempts"] for r in db.outbox).items())),
    )


def check_versions(load: Load, db: DbState) -> dict[str, Any]:
    """draft=1, confirmed=2, closed=3 for every order; the final status is the flow's last ack."""
    gaps = [
        {"order": i, "status": r["status"], "version": r["version"]}
        for i, r in db.orders.items()
        if VERSION_OF.get(r["status"]) != r["version"]
    ]
    wrong_status = []
    for record in load.orders:
        if len(record.order_ids) != 1:
            continue
        row = db.orders.get(next(iter(record.order_ids)))
        expected = (
            "closed"
            if record.acked("close")
            else "confirmed"
            if record.acked("confirm")
            else "draft"
        )
        if row is not None and row["status"] != expected:
            wrong_status.append({"key": record.key, "expected": expected, "row": _plain(row)})
    by_status = Counter(r["status"] for r in db.orders.values())
    return _result(
        not gaps and not wrong_status,
        [*gaps, *wrong_status],
        orders=len(db.orders),
        by_status=dict(by_status),
        version_gaps=len(gaps),
        status_not_last_ack=len(wrong_status),
    )


def check_paging(load: Load, db: DbState) -> dict[str, Any]:
    """Each scan: no id twice, strictly descending (createdAt, id), every row committed before
    it started (and still there at the end) seen."""
    bad: list[dict[str, Any]] = []
    rows = skipped = dups = 0
    gone = 0
    complete = [s for s in load.scans if s.complete]
    for n, scan in enumerate(complete, 1):
        ids = [i for _, i in scan.seen]
        rows += len(ids)
        counts = Counter(ids)
        scan_dups = sorted(i for i, c in counts.items() if c > 1)
        keys = [(created, uuid.UUID(i)) for created, i in scan.seen]
        unordered = sum(1 for a, b in itertools.pairwise(keys) if not a > b)
        existing = {i for i in scan.snapshot if i in db.orders}
        gone += len(scan.snapshot) - len(existing)
        missed = sorted(existing - set(ids))
        dups += len(scan_dups)
        skipped += len(missed)
        if scan_dups or missed or unordered:
            bad.append({"scan": n, "started_s": round(scan.started_s, 2),
                        "duplicates": scan_dups[:5], "skipped": missed[:5],
                        "out_of_order": unordered})  # fmt: skip
    return _result(
        bool(complete) and not bad,
        bad,
        scans=len(complete),
        scans_cut_short=len(load.scans) - len(complete),
        pages=sum(s.pages for s in complete),
        rows_seen=rows,
        duplicates=dups,
        skipped=skipped,
        snapshot_rows_gone_at_end=gone,
    )


_HAPROXY_LINE = re.compile(r'^\S+ \[[^\]]+\] \S+ (\S+) \S+ (\d{3}) .*"(\S+) (\S+)')


def haproxy_statuses(log: Path) -> tuple[Counter[str], list[str]]:
    """Status counts of HAProxy's request log, and the 500 lines."""
    counts: Counter[str] = Counter()
    fives: list[str] = []
    for line in _lines(log):
        match = _HAPROXY_LINE.match(line)
        if match:
            counts[match.group(2)] += 1
            if match.group(2) == "500":
                fives.append(line.strip())
    return counts, fives


def api_log_errors(logs: Iterable[Path]) -> tuple[Counter[str], list[str]]:
    """5xx the API instances logged (they log every answer >= 500), and error lines."""
    counts: Counter[str] = Counter()
    errors: list[str] = []
    for path in logs:
        for line in _lines(path):
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "request":
                counts[str(entry.get("status"))] += 1
            if entry.get("level") in ("error", "critical") or entry.get("status") == 500:
                errors.append(line.strip()[:2000])
    return counts, errors


def check_no_500(rec: Recorder, log_dir: Path, api_names: list[str]) -> dict[str, Any]:
    """No 500 at the client, in HAProxy's log, or in any API instance's log."""
    client_500 = sum(n for (_, status), n in rec.counts.items() if status == "500")
    haproxy, haproxy_500 = haproxy_statuses(log_dir / "haproxy.log")
    api, api_errors = api_log_errors(log_dir / f"{name}.log" for name in api_names)
    return _result(
        client_500 == 0 and not haproxy_500 and api.get("500", 0) == 0 and not api_errors,
        [*rec.server_errors, *haproxy_500, *api_errors],
        client_500=client_500,
        haproxy_statuses=dict(sorted(haproxy.items())),
        api_logged_5xx=dict(sorted(api.items())),
        api_error_lines=len(api_errors),
    )


def check_resolved(rec: Recorder) -> dict[str, Any]:
    """Every request got a definitive answer before the deadline, and the one expected."""
    return _result(
        not rec.unresolved and not rec.unexpected,
        [
            *({"unresolved": u} for u in rec.unresolved),
            *({"unexpected": u} for u in rec.unexpected),
        ],
        unresolved=len(rec.unresolved),
        unexpected=len(rec.unexpected),
    )


def per_op_statuses(rec: Recorder) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = defaultdict(dict)
    for (op, status), n in sorted(rec.counts.items()):
        table[op][status] = n
    return dict(table)


def _plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
