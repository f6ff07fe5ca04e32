-- worker_register: a worker joins (or re-joins). The join token is checked by the caller, which
-- passes the result in, so a refused token stores nothing. Bumps the worker's epoch (its fencing
-- token): every message of an older session is refused from now on.
-- KEYS:   1 events
-- ARGV:   4 worker id; 5 token ok ('1'/'0'); 6 address; 7 lease ms; 8 GPU indexes (csv);
--         9 candidate lineage; 10 lineage the caller knew ('' for none); 11 recovery window
--         ms (see ensure_lineage in the prelude); 12 registration id ('' for none); 13.. field,
--         value pairs of the inventory (gpus, host_memory_bytes, checkpoints, bandwidths,
--         agent_version)
-- Repeat: a call whose registration id is the one stored (the caller's first call timed out
--         but ran) changes nothing but the lease and answers as the first did, so a timed-out
--         registration can be retried safely; unless the worker was lost since.
-- Writes: worker:<id> (status initializing, epoch + 1, version + 1, registration), workers,
--         workers:status:*, address:<addr> (and the old address's key if it pointed here),
--         lease_deadlines, lost_workers (no longer lost), free_gpus:<id> (all GPUs minus those
--         of the worker's live instances); lineage and recovering as ensure_lineage does
-- Events: worker.registered {epoch}; store.recovering when Redis is found to have lost state
-- Reply:  {'ok', epoch, lease deadline ms, version, lineage} | {'unauthenticated'}
--         | {'address_in_use', holder}
local id, address, lease_ms = ARGV[4], ARGV[6], tonumber(ARGV[7])
if ARGV[5] ~= '1' then return { 'unauthenticated' } end
local now = now_ms()
local lineage = ensure_lineage(ARGV[9], ARGV[10], ARGV[11])
local key = K.worker(id)
if ARGV[12] ~= '' then
  local cur = redis.call('HMGET', key, 'registration', 'status', 'epoch', 'version')
  if cur[1] == ARGV[12] and cur[2] ~= 'lost' then
    local deadline = now + lease_ms
    redis.call('ZADD', K.lease_deadlines, deadline, id)
    return { 'ok', cur[3], deadline, cur[4], lineage }
  end
end
local holder = redis.call('GET', K.address(address))
if holder and holder ~= id then
  local deadline = redis.call('ZSCORE', K.lease_deadlines, holder)
  if deadline and tonumber(deadline) > now then return { 'address_in_use', holder } end
end
local old = redis.call('HMGET', key, 'status', 'address')
if old[1] then redis.call('SREM', K.workers_status(old[1]), id) end
if old[2] and old[2] ~= address and redis.call('GET', K.address(old[2])) == id then
  redis.call('DEL', K.address(old[2]))
end
local epoch = redis.call('HINCRBY', key, 'epoch', 1)
local version = redis.call('HINCRBY', key, 'version', 1)
local pairs_ = {}
for i = 13, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', key, 'worker_id', id, 'status', 'initializing', 'address', address,
  'registered_ms', now, 'gpu_indexes', ARGV[8], 'registration', ARGV[12], unpack(pairs_))
redis.call('SADD', K.workers, id)
redis.call('SADD', K.workers_status('initializing'), id)
redis.call('SET', K.address(address), id)
local deadline = now + lease_ms
redis.call('ZADD', K.lease_deadlines, deadline, id)
redis.call('ZREM', K.lost_workers, id)
-- Free GPUs: all of them, minus those held by instances the control plane still places here.
local used = {}
for _, iid in ipairs(redis.call('SMEMBERS', K.worker_instances(id))) do
  for _, g in ipairs(split_csv(redis.call('HGET', K.instance(iid), 'gpus'))) do used[g] = true end
end
local free = K.free_gpus(id)
redis.call('DEL', free)
for _, g in ipairs(split_csv(ARGV[8])) do
  if not used[g] then redis.call('SADD', free, g) end
end
emit('worker.registered', id, 'epoch', epoch)
return { 'ok', epoch, deadline, version, lineage }
