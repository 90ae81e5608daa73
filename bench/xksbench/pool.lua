-- wrk script for xks-proxy's bench: cycles through a pool of pre-signed XKS requests
-- and prints its results as one JSON line ("XKS_BENCH_JSON {...}") from done().
--
--   wrk ... -s pool.lua URL -- POOL_FILE [MAX_REQUESTS_PER_THREAD]
--
-- POOL_FILE (written by xksbench/wrk.py) holds, after a "XKSPOOL 1" line and a count:
--   METHOD PATH \n  HEADER_COUNT \n  (NAME: VALUE \n) x HEADER_COUNT  BODY_LENGTH \n BODY \n
-- Every request is formatted once in init(); request() only picks the next one.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("thread_id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local function load_pool(path)
   local file = assert(io.open(path, "rb"))
   assert(file:read("*l") == "XKSPOOL 1", "not a pool file: " .. path)
   local count = tonumber(file:read("*l"))
   local formatted = {}
   for i = 1, count do
      local method, target = file:read("*l"):match("^(%S+) (%S+)$")
      local headers = {}
      for _ = 1, tonumber(file:read("*l")) do
         local name, value = file:read("*l"):match("^([^:]+): (.*)$")
         headers[name] = value
      end
      local body = file:read(tonumber(file:read("*l")))
      file:read("*l") -- the newline after the body
      formatted[i] = wrk.format(method, target, headers, body)
   end
   file:close()
   return formatted
end

function init(args)
   pool = load_pool(args[1])
   pool_size = #pool
   limit = tonumber(args[2] or "0")
   sent = 0
   -- Threads start at different places so they do not send the same request together.
   position = (thread_id * 7919) % pool_size
end

function request()
   sent = sent + 1
   if limit > 0 and sent >= limit then
      wrk.thread:stop()
   end
   position = position % pool_size + 1
   return pool[position]
end

local PERCENTILES = {
   1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.95, 99.99,
}

function done(summary, latency, requests)
   local curve = {}
   for _, p in ipairs(PERCENTILES) do
      table.insert(curve, string.format("[%g,%d]", p, latency:percentile(p)))
   end
   local errors = summary.errors
   io.write(string.format(
      'XKS_BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,"curve":[%s]},' ..
      '"threads":%d}\n',
      summary.duration, summary.requests, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency.min, latency.max, latency.mean, latency.stdev, table.concat(curve, ","),
      #threads))
end
