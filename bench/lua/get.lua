-- GET /orders/{id}, walking the ids of one tenant.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")

function init(args)
  load_ids()
end

local headers = {}

function request()
  headers["X-Tenant-Id"] = tenant
  return wrk.format("GET", "/orders/" .. take_id(), headers)
end
