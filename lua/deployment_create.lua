-- deployment_create: store a new deployment as `active`.
-- KEYS:   1 events
-- ARGV:   4 name; 5.. field, value pairs of the spec (model, backend, num_gpus, metric, target,
--         min_instances, max_instances, keep_alive, backend_config)
-- Writes: deployment:<name> (status active, version 1, desired 0), deployments,
--         deployments:status:active
-- Events: deployment.created {version}
-- Reply:  {'ok', version, now_ms} | {'already_exists'}
local name = ARGV[4]
local key = K.deployment(name)
if redis.call('EXISTS', key) == 1 then return { 'already_exists' } end
local now = now_ms()
local pairs_ = {}
for i = 5, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', key, 'name', name, 'status', 'active', 'version', 1, 'created_ms', now,
  'updated_ms', now, 'desired', 0, 'last_decision', '', 'last_error', '', unpack(pairs_))
redis.call('SADD', K.deployments, name)
redis.call('SADD', K.deployments_status('active'), name)
emit('deployment.created', name, 'version', 1)
return { 'ok', 1, now }
