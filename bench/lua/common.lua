-- Shared by every scenario (loaded with dofile): thread numbering, the id walk, exact
-- status accounting and one JSON summary line that bench/wrk.py parses.
--
-- Environment: BENCH_THREADS (wrk -t), BENCH_TENANT, BENCH_EXPECT (the one status that
-- counts as success, e.g. 201 for create, 200 for replay), BENCH_IDS (a file of order ids).

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

tenant = os.getenv("BENCH_TENANT") or "bench"
expected = tonumber(os.getenv("BENCH_EXPECT") or "200")
thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")
wrong_2xx = 0
ids = {}
next_id = 0

-- This thread's share of the id file: every thread_count-th line, so no id repeats.
function load_ids()
  local path = os.getenv("BENCH_IDS")
  local line_no = 0
  for line in io.lines(path) do
    if line_no % thread_count == thread_id then
      table.insert(ids, line)
    end
    line_no = line_no + 1
  end
end

-- The next distinct id; wraps (and the wrap shows up as errors) if the file runs out.
function take_id()
  next_id = next_id + 1
  return ids[(next_id - 1) % #ids + 1]
end

-- wrk counts status > 399 itself ("Non-2xx or 3xx responses"); this counts a success
-- status that is not the expected one (a 201 where a replay's 200 was due, or the reverse).
function response(status, headers, body)
  if status ~= expected and status < 300 then
    wrong_2xx = wrong_2xx + 1
  end
end

function done(summary, latency, requests)
  local wrong = 0
  for _, thread in ipairs(threads) do
    wrong = wrong + (thread:get("wrong_2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect":%d,' ..
    '"read":%d,"write":%d,"timeout":%d,"wrong_2xx":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    wrong, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
