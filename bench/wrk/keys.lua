-- wrk script for scenario 1: every request carries an x-api-key, rotating over N keys
-- (default 1000; pass another count after "--"). done() prints one machine-readable line
-- that bench/run.sh parses: requests, req/s, latency percentiles, non-2xx, socket errors.
local requests, n = {}, 0

function init(args)
  local keys = tonumber(args[1]) or 1000
  for k = 1, keys do
    requests[k] = wrk.format("GET", "/", { ["x-api-key"] = "bench-key-" .. k })
  end
  -- each thread starts at a different key so the threads do not walk in step
  n = math.random(0, keys - 1)
end

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx=%d sockerr=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
