-- wrk script: POSTs batch-100.json (100 Segment track events, ~450 bytes each) to /v1/batch,
-- with unique messageIds per request so every event goes through dedup and is stored.
-- usage: WRITE_KEY=sr_write_... wrk -t1 -c16 -d10s --latency -s batch-unique-ids.lua http://127.0.0.1:8080/v1/batch
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local file = assert(io.open(dir .. "batch-100.json", "r"))
local template = file:read("*a")
file:close()
local counter = 0
local prefix = ""
function init(args)
  math.randomseed(os.time() + os.clock() * 1e6)
  prefix = tostring(math.random(1, 1e12))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("WRITE_KEY") or "")
request = function()
  counter = counter + 1
  local body = string.gsub(template, "__N__", prefix .. "-" .. counter)
  return wrk.format(nil, nil, nil, body)
end
