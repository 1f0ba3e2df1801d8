-- POST /orders/{id}/close over distinct confirmed orders (version 2), each with its own
-- Idempotency-Key: each succeeds once, writes one outbox row and stores its response.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

function init(args)
  load_ids()
end

local prefix = os.getenv("BENCH_KEY_PREFIX") or "close"
local headers = {["If-Match"] = '"2"'}

function request()
  headers["X-Tenant-Id"] = tenant
  headers["Idempotency-Key"] = prefix .. "-" .. thread_id .. "-" .. next_id
  return wrk.format("POST", "/orders/" .. take_id() .. "/close", headers)
end
