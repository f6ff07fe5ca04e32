-- worker_ready: the worker has reported its inventory; reconcile its instances with what it
-- actually runs (its report wins over Redis) and make it placeable.
-- KEYS:   1 events
-- ARGV:   4 worker id; 5 epoch; 6.. quadruples (instance id, model, state, GPU csv) of running
--         instances, state one of loading | ready | draining
-- Writes: worker:<id> (status ready, version + 1), workers:status:*; each of its instances:
--         a reported one takes the reported state and GPUs, a live one not reported is stopped
--         (a pending one is kept: its start command may still be on its way); a reported one
--         with no record at all is adopted (its record rebuilt from the report) only while
--         the store recovers from lost state (the `recovering` key: Redis restarted empty
--         under running registries); otherwise it is unknown and the worker stops it, so a
--         worker cannot make up instances that were never placed on it; free_gpus:<id>
-- Events: instance.<state> per changed or adopted instance, worker.ready
-- Repeat: at the same epoch, on a worker already ready (the caller's first call timed out but
--         ran), it changes nothing and answers {'noop', version, unknown...} as the first did:
--         reconciling again could undo what happened since (a drain ordered meanwhile).
-- Reply:  {'ok', version, unknown instance id...} (unknown: reported but placed elsewhere or
--         already ended; the worker should stop them) | {'noop', ...} (a repeat)
--         | {'not_found'} | {'stale_epoch', current} | {'wrong_state', status}
local id, epoch = ARGV[4], ARGV[5]
local key = K.worker(id)
local w = redis.call('HMGET', key, 'epoch', 'status', 'gpu_indexes')
if not w[2] then return { 'not_found' } end
if w[1] ~= epoch then return { 'stale_epoch', w[1] } end
if w[2] == 'ready' then
  local reply = { 'noop', redis.call('HGET', key, 'version') }
  for i = 6, #ARGV - 3, 4 do
    local rec = redis.call('HMGET', K.instance(ARGV[i]), 'status', 'worker_id')
    if not rec[1] or rec[2] ~= id or TERMINAL[rec[1]] then reply[#reply + 1] = ARGV[i] end
  end
  return reply
end
if w[2] ~= 'initializing' then return { 'wrong_state', w[2] } end
local now = now_ms()
local recovering = redis.call('EXISTS', K.recovering) == 1
local reported, unknown = {}, {}
for i = 6, #ARGV - 3, 4 do
  local iid, model, state, gpus = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local ikey = K.instance(iid)
  local rec = redis.call('HMGET', ikey, 'status', 'model', 'worker_id')
  if not rec[1] and recovering and redis.call('EXISTS', ikey) == 0 then
    reported[iid] = true
    redis.call('HSET', ikey, 'instance_id', iid, 'model', model, 'worker_id', id,
      'status', state, 'gpus', gpus, 'reason', 'rebuilt from the worker\'s report', 'version', 1,
      'created_ms', now, 'updated_ms', now)
    redis.call('SADD', K.instances_status(state), iid)
    redis.call('SADD', K.model_instances(model), iid)
    redis.call('SADD', K.worker_instances(id), iid)
    emit('instance.' .. state, iid, 'model', model, 'worker', id, 'version', 1,
      'reason', 'rebuilt from the worker\'s report')
  elseif not rec[1] or rec[3] ~= id or TERMINAL[rec[1]] then
    unknown[#unknown + 1] = iid
  else
    reported[iid] = true
    redis.call('HSET', K.instance(iid), 'gpus', gpus)
    if rec[1] ~= state then
      instance_move(iid, rec[1], rec[2], id, state, 'reported by worker on rejoin', now)
    end
  end
end
for _, iid in ipairs(redis.call('SMEMBERS', K.worker_instances(id))) do
  if not reported[iid] then
    local rec = redis.call('HMGET', K.instance(iid), 'status', 'model')
    if rec[1] and rec[1] ~= 'pending' then
      instance_move(iid, rec[1], rec[2], id, 'stopped', 'not running on worker after rejoin', now)
    end
  end
end
-- Recompute free GPUs from what is now placed here.
local used = {}
for _, iid in ipairs(redis.call('SMEMBERS', K.worker_instances(id))) do
  for _, g in ipairs(split_csv(redis.call('HGET', K.instance(iid), 'gpus'))) do used[g] = true end
end
local free = K.free_gpus(id)
redis.call('DEL', free)
for _, g in ipairs(split_csv(w[3])) do
  if not used[g] then redis.call('SADD', free, g) end
end
redis.call('SMOVE', K.workers_status('initializing'), K.workers_status('ready'), id)
redis.call('HSET', key, 'status', 'ready')
local v = redis.call('HINCRBY', key, 'version', 1)
emit('worker.ready', id, 'epoch', epoch)
local reply = { 'ok', v }
for _, iid in ipairs(unknown) do reply[#reply + 1] = iid end
return reply
