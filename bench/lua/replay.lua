-- POST /orders again and again with one key that already has an order: every answer
-- must be the stored 200 replay.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

wrk.method = "POST"
wrk.path = "/orders"
wrk.body = "{}"
wrk.headers["X-Tenant-Id"] = tenant
wrk.headers["Idempotency-Key"] = os.getenv("BENCH_KEY")
wrk.headers["Content-Type"] = "application/json"
