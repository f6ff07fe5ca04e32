-- deployment_set_unplaceable: the Scaler leader records that a model cannot be placed on any
-- live worker, and why (or, with an empty reason, that it can be placed again), so Dispatch
-- fails held requests at once instead of holding them until their deadline. Fenced: a deposed
-- leader's write is refused. A repeated verdict writes nothing and emits nothing.
-- KEYS:   1 events
-- ARGV:   4 name; 5 leader role; 6 fencing token; 7 reason ('' = placeable again)
-- Writes: unplaceable (hash model -> reason): field set, or removed when the reason is empty
-- Events: deployment.unplaceable {reason} when the verdict changed ('' = placeable again)
-- Reply:  {'ok', '1'} changed | {'noop', '0'} unchanged | {'not_leader'} | {'not_found'}
local name, reason = ARGV[4], ARGV[7]
if redis.call('HGET', K.leader(ARGV[5]), 'token') ~= ARGV[6] then return { 'not_leader' } end
local current = redis.call('HGET', K.unplaceable, name)
if reason == '' then
  if not current then return { 'noop', '0' } end
  redis.call('HDEL', K.unplaceable, name)
else
  -- Only a deployment that exists is marked: a mark must never outlive its deployment.
  if redis.call('EXISTS', K.deployment(name)) == 0 then return { 'not_found' } end
  if current == reason then return { 'noop', '0' } end
  redis.call('HSET', K.unplaceable, name, reason)
end
emit('deployment.unplaceable', name, 'reason', reason)
return { 'ok', '1' }
