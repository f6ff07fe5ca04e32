-- leases_expired: workers whose lease deadline has passed (by the Redis clock), with their
-- current epochs, oldest first. Read-only; the caller declares each one lost with worker_lost
-- (mode 'expired'), which re-checks the deadline.
-- KEYS:   1 events (routing only)
-- ARGV:   4 most workers to return
-- Writes: nothing
-- Events: none
-- Reply:  {'ok', id, epoch, id, epoch, ...}
local ids = redis.call('ZRANGEBYSCORE', K.lease_deadlines, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[4]))
local reply = { 'ok' }
for _, id in ipairs(ids) do
  reply[#reply + 1] = id
  reply[#reply + 1] = redis.call('HGET', K.worker(id), 'epoch') or '0'
end
return reply
