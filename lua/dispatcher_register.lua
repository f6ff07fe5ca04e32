-- dispatcher_register: a Dispatch replica says it is alive and where workers reach it. Called
-- every second or so; the entry lapses if the replica stops calling.
-- KEYS:   1 events
-- ARGV:   4 replica id; 5 endpoint (http://host:port); 6 TTL ms
-- Writes: dispatchers (score = expiry), dispatcher_endpoints (id -> endpoint)
-- Events: dispatch.joined {endpoint} when the replica was not listed (or its endpoint changed)
-- Reply:  {'ok', expiry ms}
local id, endpoint = ARGV[4], ARGV[5]
local now = now_ms()
local known = redis.call('ZSCORE', K.dispatchers, id)
local old = redis.call('HGET', K.dispatcher_endpoints, id)
local expiry = now + tonumber(ARGV[6])
redis.call('ZADD', K.dispatchers, expiry, id)
redis.call('HSET', K.dispatcher_endpoints, id, endpoint)
if not known or tonumber(known) <= now or old ~= endpoint then
  emit('dispatch.joined', id, 'endpoint', endpoint)
end
return { 'ok', expiry }
