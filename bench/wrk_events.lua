-- wrk script: every request carries new Caliper events (fresh urn:uuid ids), so the sidecar
-- stores each one instead of answering "duplicate".
--   TEMPLATE  a file holding one event whose id is the text __ID__
--   BATCH     events per request (default 1: a single event; more: a JSON array)
local template_path = os.getenv("TEMPLATE")
local batch = tonumber(os.getenv("BATCH") or "1")
local file = assert(io.open(template_path, "r"))
local template = file:read("*a")
file:close()
local before, after = template:match("^(.-)__ID__(.*)$")
local counter = 0
local prefix

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  prefix = string.format("%08x-%04x-4%03x", math.random(0, 0x7fffffff),
    math.random(0, 0xffff), math.random(0, 0xfff))
end

local function event()
  counter = counter + 1
  return before .. string.format("urn:uuid:%s-%04x-%012x", prefix,
    math.random(0x8000, 0xbfff), counter) .. after
end

function request()
  local body
  if batch == 1 then
    body = event()
  else
    local events = {}
    for i = 1, batch do events[i] = event() end
    body = "[" .. table.concat(events, ",") .. "]"
  end
  return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
