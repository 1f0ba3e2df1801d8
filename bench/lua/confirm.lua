-- PATCH /orders/{id}/confirm over distinct fresh drafts (version 1): each succeeds once.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

function init(args)
  load_ids()
end

local headers = {["If-Match"] = '"1"', ["Content-Type"] = "application/json"}

function request()
  headers["X-Tenant-Id"] = tenant
  return wrk.format("PATCH", "/orders/" .. take_id() .. "/confirm", headers,
    '{"totalCents":1999}')
end
