"""`make bench-scale`: list and create with 1,000,000 orders over 100 tenants.

The orders are bulk-loaded by SQL (Zipf-sized tenants, so the biggest one holds ~190,000
rows, interleaved in arrival order as real traffic would leave them). Measured through the
API with wrk: the first page and a page 50,000 rows deep (reached with a real cursor), and
create, each compared with the database before the load. EXPLAIN shows the plan of the
list statement: an index scan on (tenant_id, created_at DESC, id DESC), no sort.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg

from bench.harness import (
    BENCH,
    LoadResult,
    fresh_database,
    machine,
    memory_mb,
    out,
    run_wrk,
    serve,
    write_results,
)
from bench.run import deep_cursor, insert_orders
from orders_api.orders import store

TOTAL_ORDERS = 1_000_000
TENANTS = 100
DEEP = 50_000
DEEP_FILTERED = 15_000  # within the biggest tenant's closed orders (a third of its rows)
SMALL_TENANT = "scale-small"

BULK_LOAD = """
INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
SELECT gen_random_uuid(), tenant, status, version, total, ts, ts
FROM (
    SELECT t.tenant,
           (ARRAY['draft', 'confirmed', 'closed'])[1 + g % 3] AS status,
           1 + g % 3 AS version,
           CASE WHEN g % 3 = 0 THEN NULL ELSE g % 100000 END AS total,
           now() - interval '1 hour' - random() * interval '30 days' AS ts
    FROM unnest($1::text[], $2::int[]) AS t(tenant, n),
         LATERAL generate_series(1, t.n) AS g
) AS generated
ORDER BY ts
"""


def tenant_sizes(total: int = TOTAL_ORDERS) -> dict[str, int]:
    """Zipf: tenant k holds a share proportional to 1/k; the rounding remainder goes to k=1."""
    harmonic = sum(1 / k for k in range(1, TENANTS + 1))
    sizes = {f"scale-{k:03d}": int(total / (k * harmonic)) for k in range(1, TENANTS + 1)}
    sizes["scale-001"] += total - sum(sizes.values())
    return sizes


async def bulk_load(url: str, sizes: dict[str, int]) -> float:
    conn = await asyncpg.connect(url, command_timeout=None)
    started = time.perf_counter()
    try:
        await conn.execute(BULK_LOAD, list(sizes), list(sizes.values()))
        await conn.execute("VACUUM (ANALYZE) orders")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def explain(url: str, tenant: str, depth: int, status: str | None = None) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the API's list statement (orders_api.orders.store), for the
    first page or the page `depth` rows in; filtered by `status` when given."""
    where = "tenant_id = $1" + ("" if status is None else " AND status = $3")
    conn = await asyncpg.connect(url)
    try:
        if status is None:
            sql, params = store.LIST_FIRST_PAGE, [tenant, 11]
        else:
            sql, params = store.LIST_FIRST_PAGE_BY_STATUS, [tenant, 11, status]
        if depth:
            row = await conn.fetchrow(
                f"SELECT created_at, id FROM orders WHERE {where}"
                " ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
                tenant,
                depth - 1,
                *([] if status is None else [status]),
            )
            assert row is not None
            after = [row["created_at"], row["id"]]
            if status is None:
                sql, params = store.LIST_AFTER_CURSOR, [tenant, 11, *after]
            else:
                sql, params = store.LIST_AFTER_CURSOR_BY_STATUS, [tenant, 11, *after, status]
        # A generic plan is what a prepared statement runs after its first executions.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *params)
    finally:
        await conn.close()
    plan = [r[0] for r in rows]
    text = "\n".join(plan)
    index = (
        "ix_orders_tenant_created_id" if status is None else "ix_orders_tenant_status_created_id"
    )
    return {
        "plan": plan,
        "index_scan": f"Index Scan using {index}" in text,
        "sort": any(line.strip().startswith(("Sort", "->  Sort")) for line in plan),
    }


def summary(result: LoadResult) -> str:
    return (
        f"{result.rps:>9.1f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
        f"errors {result.errors}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--database", default="orders_bench_scale")
    parser.add_argument(
        "--orders", type=int, default=TOTAL_ORDERS, help="bulk-loaded (>= 260,000: the deep page)"
    )
    args = parser.parse_args()
    duration, conns = args.duration, args.connections

    out(f"== fresh database {args.database}, migrated")
    url = fresh_database(args.database)
    asyncio.run(insert_orders(url, SMALL_TENANT, 100))
    sizes = tenant_sizes(args.orders)
    n = "1M" if args.orders == TOTAL_ORDERS else f"{args.orders:,}"
    big = max(sizes, key=lambda name: sizes[name])
    results: dict[str, LoadResult] = {}

    def load(label: str, script: str, expect: int, env: dict[str, str], base_url: str) -> None:
        results[label] = run_wrk(
            label, script, base_url, conns, duration, {"BENCH_EXPECT": str(expect), **env}
        )
        out(f"  {label:<22} {summary(results[label])}")

    with serve(url, args.workers, "bench-scale") as server:
        base = server.base_url
        run_wrk("warm-up", "create.lua", base, conns, 2, {"BENCH_EXPECT": "201"})
        out(f"== before the load (100 orders), wrk {conns} connections, {duration}s")
        load("create (empty)", "create.lua", 201, {"BENCH_KEY_PREFIX": "empty"}, base)
        load("list first (empty)", "list.lua", 200, {"BENCH_TENANT": SMALL_TENANT}, base)

        out(
            f"== bulk load: {args.orders:,} orders over {TENANTS} tenants (biggest {big}: "
            f"{sizes[big]:,} rows)"
        )
        seconds = asyncio.run(bulk_load(url, sizes))
        out(f"  loaded and analysed in {seconds:.0f}s")
        cursor = deep_cursor(server, big, DEEP)

        out(f"== with {args.orders:,} orders")
        load(f"list first ({n})", "list.lua", 200, {"BENCH_TENANT": big}, base)
        load(
            f"list {DEEP:,} deep ({n})",
            "list.lua",
            200,
            {"BENCH_TENANT": big, "BENCH_CURSOR": cursor},
            base,
        )
        load(f"create ({n})", "create.lua", 201, {"BENCH_KEY_PREFIX": "loaded"}, base)
        workers = {pid: memory_mb(pid) for pid in server.worker_pids()}

    plans = {
        "first": asyncio.run(explain(url, big, 0)),
        "deep": asyncio.run(explain(url, big, DEEP)),
        "first, status=closed": asyncio.run(explain(url, big, 0, "closed")),
        f"{DEEP_FILTERED:,} deep, status=closed": asyncio.run(
            explain(url, big, DEEP_FILTERED, "closed")
        ),
    }
    first = results[f"list first ({n})"]
    deep = results[f"list {DEEP:,} deep ({n})"]
    create_empty, create_loaded = results["create (empty)"], results[f"create ({n})"]
    ratios = {
        "deep_over_first_p50": round(deep.p50_ms / first.p50_ms, 3),
        "deep_over_first_rps": round(first.rps / deep.rps, 3),
        "create_loaded_over_empty_p50": round(create_loaded.p50_ms / create_empty.p50_ms, 3),
    }

    out()
    for name, plan in plans.items():
        out(f"== EXPLAIN (ANALYZE, BUFFERS), {name} page of {big}")
        for line in plan["plan"]:
            out("  " + line)
    out()
    out(f"{'run':<24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label, r in results.items():
        out(f"{label:<24} {r.rps:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7}")
    out()
    deep_ok = ratios["deep_over_first_p50"] <= 1.3
    out(
        f"deep/first p50 latency: {ratios['deep_over_first_p50']:.2f} "
        f"({'PASS' if deep_ok else 'FAIL'}, target <= 1.3); by req/s "
        f"{ratios['deep_over_first_rps']:.2f}"
    )
    out(
        f"create p50 with {n} orders / before the load: "
        f"{ratios['create_loaded_over_empty_p50']:.2f}"
    )
    for name, plan in plans.items():
        verdict = "PASS" if plan["index_scan"] and not plan["sort"] else "FAIL"
        out(f"{name} page plan: index scan {plan['index_scan']}, sort {plan['sort']} ({verdict})")
    path = write_results(
        "bench-scale",
        {
            "machine": machine(),
            "workers": args.workers,
            "connections": conns,
            "duration_s": duration,
            "tenant_sizes": {"biggest": big, "rows": sizes[big], "tenants": len(sizes)},
            "results": {label: r.as_dict() for label, r in results.items()},
            "ratios": ratios,
            "explain": plans,
            "memory_per_worker": {str(pid): mem for pid, mem in workers.items()},
        },
    )
    out(f"\nresults written to {path.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
