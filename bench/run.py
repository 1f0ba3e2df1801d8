"""`make bench`: the API under wrk per scenario at 10 and 64 connections, and the ceiling.

The ceiling is the database running the same SQL the API issues for create and list, driven
by pgbench with 10 clients against the same database; API/ceiling ratios are the medians of
alternating rounds (API, then pgbench, then API ...), so drift on a noisy machine hits both.

A/B (`--ab before|granian|pgbouncer`): two servers run side by side and every scenario runs
against each in turn, the order flipped every round (A B, B A, ...), for `--load-rounds`
rounds; medians per server and the B/A ratio. No ceiling then.
  before     this tree vs another checkout's `orders-api` (`--before-dir`, its own .venv,
             e.g. `git worktree add /work/before 333bdb5`), each on its own fresh database
             migrated by its own code
  granian    `serve --server uvicorn` vs `serve --server granian`, one database
  pgbouncer  direct vs through PgBouncer in transaction mode (`?pgbouncer=true`), one database
  unnamed    direct vs direct with `?pgbouncer=true` (unnamed statements, no PgBouncer): the
             share of PgBouncer's cost that is the driver's, not the proxy's
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from bench.ceiling import create_script, list_script
from bench.harness import (
    BENCH,
    RESULTS,
    VENV_BIN,
    LoadResult,
    Server,
    database_url,
    fresh_database,
    http,
    loadavg,
    machine,
    median,
    memory_mb,
    out,
    pgbouncer,
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


def ids_file(url: str, tenant: str) -> Path:
    """Per database and tenant: an A/B run may load the same tenant into two databases."""
    return IDS / f"{make_url(url).database}-{tenant}.txt"


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
    path = ids_file(url, tenant)
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
        self.get_ids = ids_file(url, LIST_TENANT)
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
            # The same with an Idempotency-Key per request: the key is stored with the change.
            Scenario("close_keyed", "close_keyed.lua", 200, fresh("confirmed", 2)),
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


@dataclass
class Target:
    """One server of a run: which installation, which arguments, which database."""

    label: str
    database: str
    bin_dir: Path = VENV_BIN
    serve_args: tuple[str, ...] = ()
    url_query: str = ""  # appended to the server's DATABASE_URL
    bouncer: bool = False  # DATABASE_URL points at a PgBouncer in front of the database
    results: list[LoadResult] = field(default_factory=list)


def targets(args: argparse.Namespace) -> list[Target]:
    current = Target("uvicorn" if args.ab == "granian" else "after", args.database)
    if args.ab == "before":
        before_bin = Path(args.before_dir) / ".venv" / "bin"
        if not (before_bin / "orders-api").exists():
            raise SystemExit(f"{before_bin}/orders-api missing: run `make install` there first")
        return [
            Target("before", f"{args.database}_before", bin_dir=before_bin),
            current,
        ]
    if args.ab == "granian":
        return [current, Target("granian", args.database, serve_args=("--server", "granian"))]
    if args.ab in ("pgbouncer", "unnamed"):
        bounced = args.ab == "pgbouncer"
        return [
            Target("direct", args.database),
            Target(args.ab, args.database, url_query="?pgbouncer=true", bouncer=bounced),
        ]
    return [current]


@contextlib.contextmanager
def started(target: Target, url: str, workers: int, bouncer_port: int | None) -> Iterator[Server]:
    server_url = url
    if target.bouncer:
        bounced = make_url(url).set(host="127.0.0.1", port=bouncer_port)
        server_url = bounced.render_as_string(hide_password=False)
    with serve(
        server_url + target.url_query,
        workers,
        f"bench-{target.label}",
        bin_dir=target.bin_dir,
        extra_args=target.serve_args,
    ) as server:
        yield server


def median_result(results: list[LoadResult]) -> LoadResult:
    """One row for the rounds of a scenario: median req/s, p50 and p99; errors summed."""
    return LoadResult(
        **{
            **results[0].as_dict(),
            "rps": round(median([r.rps for r in results]), 1),
            "p50_ms": round(median([r.p50_ms for r in results]), 2),
            "p99_ms": round(median([r.p99_ms for r in results]), 2),
            "errors": sum(r.errors for r in results),
        }
    )


def summarise(results: list[LoadResult]) -> dict[str, Any]:
    row = median_result(results)
    return {
        "runs": len(results),
        "rps": row.rps,
        "p50_ms": row.p50_ms,
        "p99_ms": row.p99_ms,
        "errors": row.errors,
        "rps_rounds": [r.rps for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating API/ceiling rounds")
    parser.add_argument(
        "--load-rounds", type=int, default=0, help="rounds of the load (default 1; 3 with --ab)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="10,64")
    parser.add_argument("--database", default="orders_bench")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument(
        "--ab", choices=("before", "granian", "pgbouncer", "unnamed"), help="A/B run"
    )
    parser.add_argument("--before-dir", default="/work/before", help="checkout for --ab before")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]
    load_rounds = args.load_rounds or (3 if args.ab else 1)
    servers = targets(args)
    load_before = loadavg()

    urls: dict[str, str] = {}
    shutil.rmtree(IDS, ignore_errors=True)
    for target in servers:
        if target.database not in urls:
            out(f"== fresh database {target.database}, migrated by {target.bin_dir.parent.parent}")
            urls[target.database] = fresh_database(target.database, target.bin_dir)
            asyncio.run(insert_orders(urls[target.database], LIST_TENANT, LIST_ROWS))
    ceiling: dict[str, Any] = {}
    workers: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        bouncer_port = None
        if any(t.bouncer for t in servers):
            bouncer_port = stack.enter_context(pgbouncer(database_url("postgres")))
            out(f"== PgBouncer (transaction mode) on 127.0.0.1:{bouncer_port}")
        benches = []
        for target in servers:
            url = urls[target.database]
            server = stack.enter_context(started(target, url, args.workers, bouncer_port))
            bench = Bench(url, server, args.duration)
            bench.setup()
            benches.append((target, bench))
        names = [s.name for s in benches[0][1].scenarios()]
        if args.only:
            names = [name for name in names if name in args.only.split(",")]
        for target, bench in benches:
            out(f"== warm-up {target.label} ({args.workers} workers, {bench.server.base_url})")
            by_name = {s.name: s for s in bench.scenarios()}
            for name in ("get", "create", "list_first"):
                bench.load(by_name[name], max(connections), duration=2)
        out(f"== load: wrk, {args.duration}s per run, {load_rounds} round(s)")
        for round_no in range(load_rounds):
            # Odd rounds run everything in reverse order, so drift favours no server or scenario.
            order = benches if round_no % 2 == 0 else benches[::-1]
            for name in names if round_no % 2 == 0 else names[::-1]:
                for count in connections:
                    for target, bench in order:
                        # Each server's own scenario: its database, ids and cursor.
                        scenario = {s.name: s for s in bench.scenarios()}[name]
                        result = bench.load(scenario, count)
                        target.results.append(result)
                        out(
                            f"  r{round_no + 1} {target.label:<9} {scenario.name:<11} {count:>3} "
                            f"conns {result.rps:>9.1f} req/s p50 {result.p50_ms:6.2f} ms "
                            f"p99 {result.p99_ms:6.2f} ms errors {result.errors}"
                        )
        if args.rounds and not args.ab:
            out(f"== ceiling: pgbench, 10 clients, {args.rounds} alternating rounds")
            ceiling = ceiling_rounds(benches[0][1], args.rounds)
        for target, bench in benches:
            workers[target.label] = {str(pid): memory_mb(pid) for pid in bench.server.worker_pids()}

    out()
    out("== results" + (" (medians of the rounds)" if load_rounds > 1 else ""))
    summary: dict[str, dict[str, Any]] = {}
    for target in servers:
        if len(servers) > 1:
            out(f"-- {target.label}")
        grouped: dict[tuple[str, int], list[LoadResult]] = {}
        for r in target.results:
            grouped.setdefault((r.scenario, r.connections), []).append(r)
        print_table([median_result(rs) for rs in grouped.values()])
        summary[target.label] = {f"{n}@{c}": summarise(rs) for (n, c), rs in grouped.items()}
    if len(servers) == 2:
        a, b = (t.label for t in servers)
        out()
        out(f"{'scenario':<16} {a + ' req/s':>14} {b + ' req/s':>14} {b + '/' + a:>16}")
        for key, values in summary[a].items():
            ratio = summary[b][key]["rps"] / values["rps"]
            summary[b][key]["ratio_to_" + a] = round(ratio, 4)
            out(f"{key:<16} {values['rps']:>14.1f} {summary[b][key]['rps']:>14.1f} {ratio:>16.3f}")
    for label, runs in summary.items():
        for key, values in runs.items():
            if values["errors"]:
                out(f"!! {label} {key}: {values['errors']} errors (see the server log)")
        for plain, keyed in (("close@10", "close_keyed@10"), ("close@64", "close_keyed@64")):
            if plain in runs and keyed in runs:
                ratio = runs[keyed]["rps"] / runs[plain]["rps"]
                runs[keyed]["ratio_to_unkeyed"] = round(ratio, 4)
                out(f"{label}: {keyed} / {plain} req/s = {ratio:.3f}")
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
    for label, pids in workers.items():
        for pid, mem in pids.items():
            out(
                f"{label} worker {pid}: RSS {mem['rss_mb']:.1f} MiB, PSS {mem['pss_mb']:.1f} MiB, "
                f"USS {mem['uss_mb']:.1f} MiB"
            )
    if ceiling:
        out()
        for line in check_targets(servers[0].results, ceiling):
            out(line)
    load_after = loadavg()
    out(f"\nloadavg before {load_before}, after {load_after}")
    path = write_results(
        f"bench-ab-{args.ab}" if args.ab else "bench",
        {
            "machine": machine(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "ab": args.ab,
            "servers": [t.label for t in servers],
            "workers": args.workers,
            "duration_s": args.duration,
            "load_rounds": load_rounds,
            "summary": summary,
            "results": {t.label: [r.as_dict() for r in t.results] for t in servers},
            "ceiling": ceiling,
            "memory_per_worker": workers,
        },
    )
    out(f"\nresults written to {path.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
