-- instance_create: the Scaler leader places a new instance on a ready worker, reserving its
-- GPUs, and sends the worker the start command in the same step (so a crash in between can
-- neither lose the command nor leave an instance nobody was told to start).
-- KEYS:   1 events
-- ARGV:   4 instance id; 5 model; 6 worker id; 7 leader role; 8 fencing token; 9 GPU indexes
--         (csv, at least one); 10 command id; 11 command body (encoded StartInstance)
-- Writes: instance:<id> (status pending, version 1), instances:status:pending,
--         instances:model:<model>, instances:worker:<worker>, free_gpus:<worker>,
--         commands:<worker>, commands_notify
-- Events: instance.pending {model, worker, version}
-- Reply:  {'ok', version} | {'not_leader'} | {'not_found'} (deployment)
--         | {'wrong_state', deployment status} | {'worker_not_found'}
--         | {'worker_not_ready', worker status} | {'already_exists'} | {'gpu_busy', index}
local id, model, worker = ARGV[4], ARGV[5], ARGV[6]
if redis.call('HGET', K.leader(ARGV[7]), 'token') ~= ARGV[8] then return { 'not_leader' } end
local dstatus = redis.call('HGET', K.deployment(model), 'status')
if not dstatus then return { 'not_found' } end
if dstatus ~= 'active' then return { 'wrong_state', dstatus } end
local wstatus = redis.call('HGET', K.worker(worker), 'status')
if not wstatus then return { 'worker_not_found' } end
if wstatus ~= 'ready' then return { 'worker_not_ready', wstatus } end
local key = K.instance(id)
if redis.call('EXISTS', key) == 1 then return { 'already_exists' } end
local gpus = split_csv(ARGV[9])
local free = K.free_gpus(worker)
for _, g in ipairs(gpus) do
  if redis.call('SISMEMBER', free, g) == 0 then return { 'gpu_busy', g } end
end
for _, g in ipairs(gpus) do redis.call('SREM', free, g) end
local now = now_ms()
redis.call('HSET', key, 'instance_id', id, 'model', model, 'worker_id', worker,
  'status', 'pending', 'gpus', ARGV[9], 'reason', '', 'version', 1, 'created_ms', now,
  'updated_ms', now)
redis.call('SADD', K.instances_status('pending'), id)
redis.call('SADD', K.model_instances(model), id)
redis.call('SADD', K.worker_instances(worker), id)
send_command(worker, ARGV[10], ARGV[11])
emit('instance.pending', id, 'model', model, 'worker', worker, 'version', 1, 'reason', '')
return { 'ok', 1 }
