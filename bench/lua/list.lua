-- GET /orders?limit=N, the first page or (BENCH_CURSOR set) a page deep in the tenant.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

local path = "/orders?limit=" .. (os.getenv("BENCH_LIMIT") or "10")
local cursor = os.getenv("BENCH_CURSOR") or ""
if cursor ~= "" then
  path = path .. "&cursor=" .. cursor
end

wrk.method = "GET"
wrk.path = path
wrk.headers["X-Tenant-Id"] = tenant
