-- POST /orders/{id}/close over distinct confirmed orders (version 2): each succeeds once
-- and writes one outbox row.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

function init(args)
  load_ids()
end

local headers = {["If-Match"] = '"2"'}

function request()
  headers["X-Tenant-Id"] = tenant
  return wrk.format("POST", "/orders/" .. take_id() .. "/close", headers)
end
