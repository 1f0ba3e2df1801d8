-- POST /orders with a unique Idempotency-Key per request: every request is a first create.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

local prefix = os.getenv("BENCH_KEY_PREFIX") or "k"
local tenants = tonumber(os.getenv("BENCH_CREATE_TENANTS") or "16")
local counter = 0

function request()
  counter = counter + 1
  local headers = {
    ["X-Tenant-Id"] = tostring(1000 + counter % tenants),
    ["Idempotency-Key"] = prefix .. "-" .. thread_id .. "-" .. counter,
    ["Content-Type"] = "application/json",
  }
  return wrk.format("POST", "/orders", headers, "{}")
end
