-- deployment_set_unplaceable: the Scaler leader records that a model cannot be placed on any
-- live worker, and why (or, with an empty reason, that it can be placed again), so Dispatch
-- fails held requests at once instead of holding them until their deadline. Fenced: a deposed
-- leader's write is refused. A repeated verdict writes nothing and emits nothing.
-- KEYS:   1 events
-- ARGV:   4 name; 5 leader role; 6 fencing token; 7 reason ('' = placeable again)
-- Writes: unplaceable (hash model -> reason): field set, or removed when the reason is empty
-- Events: deployment.unplaceable {reason} when the verdict changed ('' = placeable again)
-- Reply:  {'ok', '1'} changed | {'noop', '0'} unchanged | {'not_leader'} | {'not_found'}
if redis.call('HGET', K.leader(ARGV[5]), 'token') ~= ARGV[6] then return { 'not_leader' } end
return set_unplaceable(ARGV[4], ARGV[7])
