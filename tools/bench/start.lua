-- wrk script for tools/bench.py: POST a saga's body and count the answers by status
-- code. wrk itself counts every 2xx/3xx as a success, but only a 200 is a completed
-- saga (202: still running after the wait, 409/502: compensated), so bench.py counts
-- sagas from these counts, not from wrk's "Requests/sec".
--
--   wrk -t2 -c8 -d8s --timeout 35s -s start.lua http://127.0.0.1:5000/start -- registration
--   wrk ... -s start.lua http://127.0.0.1:5000/transfer -- transfer
--
-- registration: the seed's own curl body, the same for every request.
-- transfer: 0.01 around the circle A->B, B->C, C->A, so no balance ever runs out.
-- done() prints one line "BENCH_JSON {...}" that bench.py reads.

local BODIES = {
  registration = {
    '{"username": "john_doe", "address": "123 Main St", "payment": "Visa"}',
  },
  transfer = {
    '{"from": "A", "to": "B", "amount": "0.01"}',
    '{"from": "B", "to": "C", "amount": "0.01"}',
    '{"from": "C", "to": "A", "amount": "0.01"}',
  },
}

local threads = {}
local requests_ = {}
local sent = 0
codes = {}            -- global: done() reads each thread's copy with thread:get

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local kind = args[1] or "registration"
  local bodies = BODIES[kind]
  if bodies == nil then
    error("unknown saga kind " .. kind)
  end
  for i, body in ipairs(bodies) do
    requests_[i] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
  end
  sent = id or 0      -- threads start at different points of the transfer circle
end

function request()
  sent = sent + 1
  return requests_[(sent - 1) % #requests_ + 1]
end

function response(status, headers, body)
  local key = tostring(status)
  codes[key] = (codes[key] or 0) + 1
end

local function json_object(t)
  local parts = {}
  for k, v in pairs(t) do
    table.insert(parts, string.format('"%s": %s', k, tostring(v)))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local c = thread:get("codes") or {}
    for k, n in pairs(c) do
      total[k] = (total[k] or 0) + n
    end
  end
  local pct = {}
  for _, p in ipairs({50, 75, 90, 99, 99.9}) do
    pct['p' .. p] = latency:percentile(p)
  end
  pct.max = latency.max
  pct.mean = string.format("%.1f", latency.mean)
  local e = summary.errors
  io.write("BENCH_JSON {" ..
    '"duration_us": ' .. summary.duration ..
    ', "requests": ' .. summary.requests ..
    ', "codes": ' .. json_object(total) ..
    ', "latency_us": ' .. json_object(pct) ..
    ', "errors": ' .. json_object({connect = e.connect, read = e.read, write = e.write,
                                  status = e.status, timeout = e.timeout}) ..
    "}\n")
end
