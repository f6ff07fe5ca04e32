-- deployment_remove: delete a deployment that is deleting and has no instances left.
-- KEYS:   1 events
-- ARGV:   4 name
-- Writes: deletes deployment:<name>; deployments, deployments:status:deleting; its field of
--         unplaceable
-- Events: deployment.removed; deployment.unplaceable {reason ''} first if it was marked
-- Reply:  {'ok'} | {'not_found'} | {'wrong_state', status} | {'has_instances', count}
local name = ARGV[4]
local key = K.deployment(name)
local status = redis.call('HGET', key, 'status')
if not status then return { 'not_found' } end
if status ~= 'deleting' then return { 'wrong_state', status } end
local n = redis.call('SCARD', K.model_instances(name))
if n > 0 then return { 'has_instances', n } end
redis.call('DEL', key)
redis.call('SREM', K.deployments, name)
redis.call('SREM', K.deployments_status('deleting'), name)
if redis.call('HDEL', K.unplaceable, name) == 1 then
  emit('deployment.unplaceable', name, 'reason', '')
end
emit('deployment.removed', name)
return { 'ok' }
