-- deployment_mark_deleting: an active deployment starts being deleted; its instances are
-- drained by the Scaler, then deployment_remove deletes the record.
-- KEYS:   1 events
-- ARGV:   4 name
-- Writes: deployment:<name> (status deleting, version + 1), deployments:status:{active,deleting}
-- Events: deployment.deleting {version}
-- Reply:  {'ok', version, now_ms} | {'not_found'} | {'wrong_state', status}
local name = ARGV[4]
local key = K.deployment(name)
local status = redis.call('HGET', key, 'status')
if not status then return { 'not_found' } end
if status ~= 'active' then return { 'wrong_state', status } end
local now = now_ms()
redis.call('HSET', key, 'status', 'deleting', 'updated_ms', now)
local v = redis.call('HINCRBY', key, 'version', 1)
redis.call('SMOVE', K.deployments_status('active'), K.deployments_status('deleting'), name)
emit('deployment.deleting', name, 'version', v)
return { 'ok', v, now }
