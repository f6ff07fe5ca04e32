-- dispatchers_list: the live Dispatch replicas and their endpoints; forgets lapsed ones.
-- KEYS:   1 events (routing only)
-- ARGV:   (none of its own)
-- Writes: dispatchers, dispatcher_endpoints (lapsed entries removed)
-- Events: none
-- Reply:  {'ok', id, endpoint, id, endpoint, ...} sorted by id
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.dispatchers, '-inf', now)) do
  redis.call('HDEL', K.dispatcher_endpoints, id)
end
redis.call('ZREMRANGEBYSCORE', K.dispatchers, '-inf', now)
local ids = redis.call('ZRANGE', K.dispatchers, 0, -1)
table.sort(ids)
local reply = { 'ok' }
for _, id in ipairs(ids) do
  reply[#reply + 1] = id
  reply[#reply + 1] = redis.call('HGET', K.dispatcher_endpoints, id) or ''
end
return reply
