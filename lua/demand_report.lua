-- demand_report: a Dispatch replica replaces its report of demand per model (requests queued
-- and in flight). The report expires with the replica: a dead replica's demand stops counting
-- once its TTL passes.
-- KEYS:   1 events (routing only)
-- ARGV:   4 reporter id; 5 TTL ms; 6.. triples (model, queued, in flight)
-- Writes: demand:<reporter> (hash model -> "queued:in_flight", PEXPIRE TTL),
--         demand_reporters (score = expiry)
-- Events: none (the report is state; cold requests also append a `demand` event)
-- Reply:  {'ok', expiry ms}
local reporter, ttl = ARGV[4], tonumber(ARGV[5])
local key = K.demand(reporter)
redis.call('DEL', key)
local fields = {}
for i = 6, #ARGV - 2, 3 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1] .. ':' .. ARGV[i + 2]
end
local expiry = now_ms() + ttl
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIRE', key, ttl)
end
redis.call('ZADD', K.demand_reporters, expiry, reporter)
return { 'ok', expiry }
