-- workers_forget: removes workers that have been lost for longer than the retention, with every
-- key of theirs, oldest first. An instance still placed on one (the Scaler normally fails those
-- long before) is failed in the same step, so nothing refers to a worker that is gone.
-- KEYS:   1 events
-- ARGV:   4 retention ms; 5 most workers to remove
-- Writes: per removed worker: worker:<id>, free_gpus:<id>, instances:worker:<id>, commands:<id>,
--         commands_acked:<id> and address:<addr> (if it still points to it) deleted; workers,
--         workers:status:lost, lease_deadlines and lost_workers lose its id; each live instance
--         of it -> failed. An index entry of a worker that is no longer lost is dropped.
-- Events: instance.failed per instance, worker.removed {lost_ms}
-- Reply:  {'ok', removed worker id...}
local cutoff = now_ms() - tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', K.lost_workers, '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[5]))
local reply = { 'ok' }
local now = now_ms()
for _, id in ipairs(ids) do
  redis.call('ZREM', K.lost_workers, id)
  local key = K.worker(id)
  local w = redis.call('HMGET', key, 'status', 'address', 'lost_ms')
  if w[1] == 'lost' or not w[1] then
    for _, iid in ipairs(redis.call('SMEMBERS', K.worker_instances(id))) do
      local rec = redis.call('HMGET', K.instance(iid), 'status', 'model')
      if rec[1] and LIVE[rec[1]] then
        instance_move(iid, rec[1], rec[2], id, 'failed', 'worker lost and removed after its retention', now)
      end
    end
    if w[2] and redis.call('GET', K.address(w[2])) == id then redis.call('DEL', K.address(w[2])) end
    redis.call('DEL', key, K.free_gpus(id), K.worker_instances(id), K.commands(id), K.commands_acked(id))
    redis.call('SREM', K.workers, id)
    redis.call('SREM', K.workers_status('lost'), id)
    redis.call('ZREM', K.lease_deadlines, id)
    emit('worker.removed', id, 'lost_ms', w[3] or '')
    reply[#reply + 1] = id
  end
end
return reply
