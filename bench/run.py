"""`make bench`: the API under wrk per scenario at 10 and 64 connections, and the ceiling.

The ceiling is the database running the same SQL the API issues for create and list, driven
by pgbench with 10 clients against the same database; API/ceiling ratios are the medians of
alternating rounds (API, then pgbench, then API ...), so drift on a noisy machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.ceiling import create_script, list_script
from bench.harness import (
    BENCH,
    RESULTS,
    LoadResult,
    Server,
    fresh_database,
    http,
    machine,
    median,
    memory_mb,
    out,
    run_pgbench,
    run_wrk,
    serve,
    write_results,
)

LIST_TENANT = "bench-list"
LIST_ROWS = 10_000
DEEP_ROWS = 5_000
REPLAY_TENANT = "bench-replay"
REPLAY_KEY = "bench-replay-key"
IDS = RESULTS / "ids"

INSERT_ORDERS = """
INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
SELECT gen_random_uuid(), $1, $2, $3, $4, ts, ts
FROM (
    SELECT clock_timestamp() - g * interval '1 millisecond'
           - (random() * 999)::int * interval '1 microsecond' AS ts
    FROM generate_series(1, $5) AS g
) AS s
RETURNING id
"""


async def insert_orders(
    url: str, tenant: str, count: int, status: str = "draft", version: int = 1
) -> Path:
    """Bulk-insert orders by SQL; their ids go to a file the Lua scripts walk."""
    total = None if status == "draft" else 1999
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(INSERT_ORDERS, tenant, status, version, total, count)
        await conn.execute("ANALYZE orders")
    finally:
        await conn.close()
    IDS.mkdir(parents=True, exist_ok=True)
    path = IDS / f"{tenant}.txt"
    path.write_text("".join(f"{row['id']}\n" for row in rows))
    return path


def deep_cursor(server: Server, tenant: str, depth: int) -> str:
    """Page through the API with limit=100 until `depth` rows are behind the cursor."""
    cursor = None
    for _ in range(depth // 100):
        query = "/orders?limit=100" + (f"&cursor={cursor}" if cursor else "")
        status, page = http("GET", server.base_url + query, {"X-Tenant-Id": tenant})
        if status != 200 or page["nextCursor"] is None:
            raise RuntimeError(f"could not page {depth} rows deep: {status} {page}")
        cursor = page["nextCursor"]
    assert cursor is not None
    return cursor


@dataclass
class Scenario:
    name: str
    script: str
    expect: int
    env: Callable[[int], dict[str, str]]


class Bench:
    def __init__(self, url: str, server: Server, duration: int) -> None:
        self.url = url
        self.server = server
        self.duration = duration
        self.run_id = uuid.uuid4().hex[:8]
        self.get_ids = IDS / f"{LIST_TENANT}.txt"
        self.cursor = ""

    def setup(self) -> None:
        status, _ = http(
            "POST",
            self.server.base_url + "/orders",
            {"X-Tenant-Id": REPLAY_TENANT, "Idempotency-Key": REPLAY_KEY},
            b"{}",
        )
        if status not in (200, 201):
            raise RuntimeError(f"replay setup failed: {status}")
        self.cursor = deep_cursor(self.server, LIST_TENANT, DEEP_ROWS)

    def scenarios(self) -> list[Scenario]:
        def fresh(status: str, version: int) -> Callable[[int], dict[str, str]]:
            def env(connections: int) -> dict[str, str]:
                tenant = f"bench-{status}-{self.run_id}-{connections}-{time.monotonic_ns()}"
                # Enough distinct orders for the fastest run we expect, with room to spare.
                count = max(20_000, self.duration * 6_000)
                ids = asyncio.run(insert_orders(self.url, tenant, count, status, version))
                return {"BENCH_TENANT": tenant, "BENCH_IDS": str(ids)}

            return env

        return [
            Scenario(
                "create",
                "create.lua",
                201,
                lambda c: {"BENCH_KEY_PREFIX": f"{self.run_id}-{c}-{time.monotonic_ns()}"},
            ),
            Scenario(
                "replay",
                "replay.lua",
                200,
                lambda c: {"BENCH_TENANT": REPLAY_TENANT, "BENCH_KEY": REPLAY_KEY},
            ),
            Scenario("confirm", "confirm.lua", 200, fresh("draft", 1)),
            Scenario("close", "close.lua", 200, fresh("confirmed", 2)),
            Scenario(
                "get",
                "get.lua",
                200,
                lambda c: {"BENCH_TENANT": LIST_TENANT, "BENCH_IDS": str(self.get_ids)},
            ),
            Scenario("list_first", "list.lua", 200, lambda c: {"BENCH_TENANT": LIST_TENANT}),
            Scenario(
                "list_deep",
                "list.lua",
                200,
                lambda c: {"BENCH_TENANT": LIST_TENANT, "BENCH_CURSOR": self.cursor},
            ),
        ]

    def load(self, scenario: Scenario, connections: int, duration: int | None = None) -> LoadResult:
        env = {"BENCH_EXPECT": str(scenario.expect), **scenario.env(connections)}
        return run_wrk(
            scenario.name,
            scenario.script,
            self.server.base_url,
            connections,
            duration or self.duration,
            env,
        )


def ceiling_rounds(bench: Bench, rounds: int) -> dict[str, Any]:
    """Alternate API and pgbench runs for create and list; medians of the per-round ratios."""
    by_name = {s.name: s for s in bench.scenarios()}
    pairs = {
        "create": (by_name["create"], *create_script(RESULTS)),
        "list": (by_name["list_first"], *list_script(RESULTS, LIST_TENANT, 10)),
    }
    report: dict[str, Any] = {}
    for name in pairs:
        report[name] = {"api_rps": [], "ceiling_tps": [], "ratio": []}
    for round_no in range(1, rounds + 1):
        for name, (scenario, script, defines) in pairs.items():
            api = bench.load(scenario, 10)
            ceiling = run_pgbench(script, bench.url, 10, bench.duration, defines)
            ratio = api.rps / ceiling["tps"]
            report[name]["api_rps"].append(api.rps)
            report[name]["ceiling_tps"].append(ceiling["tps"])
            report[name]["ratio"].append(round(ratio, 4))
            out(
                f"  round {round_no} {name:<7} API {api.rps:>8.1f} req/s (p99 {api.p99_ms:.1f} ms,"
                f" errors {api.errors})   pgbench {ceiling['tps']:>9.1f} tps   "
                f"ratio {ratio:6.1%}"
            )
    for values in report.values():
        values["median_api_rps"] = median(values["api_rps"])
        values["median_ceiling_tps"] = median(values["ceiling_tps"])
        values["median_ratio"] = median(values["ratio"])
    return report


def print_table(results: list[LoadResult]) -> None:
    out(f"{'scenario':<11} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in results:
        out(
            f"{r.scenario:<11} {r.connections:>5} {r.rps:>9.1f} {r.p50_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.errors:>7}"
        )


def check_targets(results: list[LoadResult], ceiling: dict[str, Any]) -> list[str]:
    lines = []
    create = ceiling["create"]["median_ratio"]
    listing = ceiling["list"]["median_ratio"]
    lines.append(f"create >= 35% of ceiling: {create:.1%} {'PASS' if create >= 0.35 else 'FAIL'}")
    lines.append(f"list   >= 10% of ceiling: {listing:.1%} {'PASS' if listing >= 0.10 else 'FAIL'}")
    by_key = {(r.scenario, r.connections): r for r in results}
    for (name, connections), r in by_key.items():
        if connections == 10:
            verdict = "PASS" if r.p99_ms < 25 else "FAIL"
            lines.append(f"{name:<11} p99 at 10 conns < 25 ms: {r.p99_ms:.1f} ms {verdict}")
        if connections == 64 and (name, 10) in by_key:
            base = by_key[(name, 10)].rps
            ok = r.errors == 0 and r.rps >= 0.85 * base
            lines.append(
                f"{name:<11} 64 conns: errors {r.errors}, {r.rps / base:.0%} of the "
                f"10-conn req/s {'PASS' if ok else 'FAIL'}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating API/ceiling rounds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="10,64")
    parser.add_argument("--database", default="orders_bench")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]

    out(f"== fresh database {args.database}, migrated")
    url = fresh_database(args.database)
    shutil.rmtree(IDS, ignore_errors=True)
    asyncio.run(insert_orders(url, LIST_TENANT, LIST_ROWS))
    results: list[LoadResult] = []
    with serve(url, args.workers, "bench") as server:
        bench = Bench(url, server, args.duration)
        bench.setup()
        scenarios = bench.scenarios()
        if args.only:
            wanted = set(args.only.split(","))
            scenarios = [s for s in scenarios if s.name in wanted]
        out(f"== warm-up ({args.workers} workers, {server.base_url})")
        by_name = {s.name: s for s in bench.scenarios()}
        for name in ("get", "create", "list_first"):
            bench.load(by_name[name], max(connections), duration=2)
        out(f"== load: wrk, {args.duration}s per run")
        for scenario in scenarios:
            for count in connections:
                result = bench.load(scenario, count)
                results.append(result)
                out(
                    f"  {scenario.name:<11} {count:>3} conns {result.rps:>9.1f} req/s "
                    f"p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms "
                    f"errors {result.errors}"
                )
        out(f"== ceiling: pgbench, 10 clients, {args.rounds} alternating rounds")
        ceiling = ceiling_rounds(bench, args.rounds) if args.rounds else {}
        workers = {pid: memory_mb(pid) for pid in server.worker_pids()}

    out()
    out("== results")
    print_table(results)
    if ceiling:
        out()
        header = f"{'ceiling (10 clients)':<22} {'API req/s':>10} {'pgbench tps':>12}"
        out(f"{header} {'API/ceiling':>12}")
        for name, values in ceiling.items():
            out(
                f"{name:<22} {values['median_api_rps']:>10.1f} "
                f"{values['median_ceiling_tps']:>12.1f} {values['median_ratio']:>12.1%}"
            )
        out("(medians of the rounds; the ratio is the median of the per-round ratios)")
    out()
    for pid, mem in workers.items():
        out(
            f"worker {pid}: RSS {mem['rss_mb']:.1f} MiB, PSS {mem['pss_mb']:.1f} MiB, "
            f"USS {mem['uss_mb']:.1f} MiB"
        )
    if ceiling:
        out()
        for line in check_targets(results, ceiling):
            out(line)
    path = write_results(
        "bench",
        {
            "machine": machine(),
            "workers": args.workers,
            "duration_s": args.duration,
            "results": [r.as_dict() for r in results],
            "ceiling": ceiling,
            "memory_per_worker": {str(pid): mem for pid, mem in workers.items()},
        },
    )
    out(f"\nresults written to {path.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
