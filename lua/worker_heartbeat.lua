-- worker_heartbeat: renew a worker's lease. The hot path of the registry: one round trip, no
-- event, three commands.
-- KEYS:   1 events (routing only)
-- ARGV:   4 worker id; 5 epoch; 6 lease ms
-- Writes: lease_deadlines (score = now + lease)
-- Events: none
-- Reply:  {'ok', lease deadline ms} | {'not_found'} | {'stale_epoch', current} | {'lost'}
local id = ARGV[4]
local w = redis.call('HMGET', K.worker(id), 'epoch', 'status')
if not w[2] then return { 'not_found' } end
if w[1] ~= ARGV[5] then return { 'stale_epoch', w[1] } end
if w[2] == 'lost' then return { 'lost' } end
local deadline = now_ms() + tonumber(ARGV[6])
redis.call('ZADD', K.lease_deadlines, deadline, id)
return { 'ok', deadline }
