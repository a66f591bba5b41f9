-- wrk script: one `Authorization: Bearer` token per request, from a file of tokens (one a line).
--
-- Environment (the driver sets it):
--   WRK_MODE     "pool":  every thread takes the file's lines round-robin (thread i starting at line i), so
--                         the 1,000 pooled tokens are sent over and over.
--                "fresh": thread i of n takes lines i, i+n, i+2n, ... once each, so no token is sent twice
--                         in a run. A thread that runs out starts over and counts it in "reused_wraps"
--                         (the driver flags a result with wraps > 0; there should be none).
--   WRK_TOKENS   the token file
--   WRK_THREADS  wrk's -t
--   WRK_RESULT   where done() writes requests, duration, latency percentiles and errors as JSON
--
-- The file is read whole at init and lines are cut out on demand (string.find), so init stays cheap even
-- for 100+ MB of tokens.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

-- Per-thread state (globals, so done() can read them through thread:get).
reused = 0
sent = 0
local mode, data, pos, nthreads
local pool = {}

local function skip(n)
   for _ = 1, n do
      local e = data:find("\n", pos, true)
      if not e then
         return false
      end
      pos = e + 1
   end
   return true
end

function init(args)
   mode = os.getenv("WRK_MODE") or "pool"
   nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
   local f = assert(io.open(assert(os.getenv("WRK_TOKENS"), "WRK_TOKENS not set"), "rb"))
   data = f:read("*a")
   f:close()
   if mode == "pool" then
      -- Pre-built requests: the Lua cost per request is one table lookup, the same for every target.
      for line in data:gmatch("[^\n]+") do
         pool[#pool + 1] = wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. line })
      end
      data = nil
      pos = tid % #pool
   else
      pos = 1
      skip(tid)
   end
end

local function next_fresh()
   local e = data:find("\n", pos, true)
   if not e then
      reused = reused + 1
      pos = 1
      skip(tid)
      e = data:find("\n", pos, true)
   end
   local line = data:sub(pos, e - 1)
   pos = e + 1
   skip(nthreads - 1)
   return line
end

function request()
   sent = sent + 1
   if mode == "pool" then
      pos = pos % #pool + 1
      return pool[pos]
   end
   return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. next_fresh() })
end

function done(summary, latency, requests)
   local reused_total, sent_total = 0, 0
   for _, t in ipairs(threads) do
      reused_total = reused_total + (t:get("reused") or 0)
      sent_total = sent_total + (t:get("sent") or 0)
   end
   local e = summary.errors
   local out = string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "sent": %d, "reused_wraps": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"mean": %.1f, "stdev": %.1f, "p50": %d, "p75": %d, "p90": %d, "p99": %d, '
         .. '"p999": %d, "max": %d}}\n',
      summary.requests, summary.duration, summary.bytes, sent_total, reused_total,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max)
   local f = assert(io.open(assert(os.getenv("WRK_RESULT"), "WRK_RESULT not set"), "w"))
   f:write(out)
   f:close()
end
