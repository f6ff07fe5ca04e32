-- demand_read: total demand per model over every live Dispatch replica's report; forgets the
-- reporters whose reports expired.
-- KEYS:   1 events (routing only)
-- ARGV:   (none of its own)
-- Writes: demand_reporters (expired members removed)
-- Events: none
-- Reply:  {'ok', model, queued, in_flight, model, queued, in_flight, ...}
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', K.demand_reporters, '-inf', now)
local totals, order = {}, {}
for _, reporter in ipairs(redis.call('ZRANGE', K.demand_reporters, 0, -1)) do
  local flat = redis.call('HGETALL', K.demand(reporter))
  for i = 1, #flat, 2 do
    local model = flat[i]
    local q, f = string.match(flat[i + 1], '^(%d+):(%d+)$')
    if q then
      if not totals[model] then
        totals[model] = { 0, 0 }
        order[#order + 1] = model
      end
      totals[model][1] = totals[model][1] + tonumber(q)
      totals[model][2] = totals[model][2] + tonumber(f)
    end
  end
end
local reply = { 'ok' }
for _, model in ipairs(order) do
  reply[#reply + 1] = model
  reply[#reply + 1] = totals[model][1]
  reply[#reply + 1] = totals[model][2]
end
return reply
