-- wrk script for `dp-router bench`: POST one chat completion per request.
--
-- The body is built once here (not per request) so wrk stays a fast C loop and
-- the figures measure the server, not the load generator. Settings come from
-- the environment, since wrk passes no arguments to `init` before `done`:
--   BENCH_MODEL         model name (default "bench")
--   BENCH_PROMPT_BYTES  prompt characters (default 64: a "small body")
--   BENCH_MAX_TOKENS    max_tokens (default 16)
-- At the end it prints one line "BENCH_JSON {...}" that bench.py parses:
-- latencies in microseconds, exact from wrk's HDR histogram.

local model = os.getenv("BENCH_MODEL") or "bench"
local prompt_bytes = tonumber(os.getenv("BENCH_PROMPT_BYTES") or "64")
local max_tokens = tonumber(os.getenv("BENCH_MAX_TOKENS") or "16")

-- Words rather than one repeated letter: a realistic mix for any code that
-- scans the prompt (prefix hashing, JSON parsing). Deterministic.
local words = { "the ", "gateway ", "routes ", "requests ", "to ", "replicas ", "by ", "load " }
local parts, n, i = {}, 0, 0
while n < prompt_bytes do
  local w = words[(i % #words) + 1]
  parts[#parts + 1] = w
  n = n + #w
  i = i + 1
end
local prompt = string.sub(table.concat(parts), 1, prompt_bytes)

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"' .. prompt
  .. '"}],"max_tokens":' .. max_tokens .. ',"stream":false}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
