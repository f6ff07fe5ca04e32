-- worker_lost: a worker's session dropped, or its lease expired. Its live instances become
-- `lost` (not routable) in the same transition.
-- KEYS:   1 events
-- ARGV:   4 worker id; 5 epoch (the session being declared lost); 6 mode: 'dropped' (its
--         stream ended) or 'expired' (refused while the lease still runs); 7 reason
-- Writes: worker:<id> (status lost, version + 1), workers:status:*, lease_deadlines,
--         lost_workers (score = now: removed once the retention has passed); each live
--         instance of the worker -> lost
-- Events: instance.lost per instance, worker.lost {epoch, reason}
-- Reply:  {'ok', version, instances lost} | {'not_found'} | {'stale_epoch', current}
--         | {'wrong_state', 'lost'} | {'lease_alive', deadline ms}
local id, epoch, mode, reason = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = K.worker(id)
local w = redis.call('HMGET', key, 'epoch', 'status')
if not w[2] then return { 'not_found' } end
if w[1] ~= epoch then return { 'stale_epoch', w[1] } end
if w[2] == 'lost' then return { 'wrong_state', 'lost' } end
local now = now_ms()
if mode == 'expired' then
  local deadline = redis.call('ZSCORE', K.lease_deadlines, id)
  if deadline and tonumber(deadline) > now then return { 'lease_alive', deadline } end
end
redis.call('SMOVE', K.workers_status(w[2]), K.workers_status('lost'), id)
redis.call('HSET', key, 'status', 'lost', 'lost_reason', reason, 'lost_ms', now)
local v = redis.call('HINCRBY', key, 'version', 1)
redis.call('ZREM', K.lease_deadlines, id)
redis.call('ZADD', K.lost_workers, now, id)
local n = 0
for _, iid in ipairs(redis.call('SMEMBERS', K.worker_instances(id))) do
  local rec = redis.call('HMGET', K.instance(iid), 'status', 'model')
  if rec[1] and rec[1] ~= 'lost' and LIVE[rec[1]] then
    instance_move(iid, rec[1], rec[2], id, 'lost', 'worker lost: ' .. reason, now)
    n = n + 1
  end
end
emit('worker.lost', id, 'epoch', epoch, 'reason', reason)
return { 'ok', v, n }
