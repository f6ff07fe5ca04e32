-- deployment_set_desired: the Scaler leader records how many instances a model should have,
-- the decision behind it, and (optionally) an error that stopped it starting the model.
-- Fenced: a deposed leader's write is refused.
-- KEYS:   1 events
-- ARGV:   4 name; 5 leader role; 6 fencing token; 7 desired; 8 decision (JSON); 9 last_error
-- Writes: deployment:<name> (desired, last_decision, last_error); the version is not bumped:
--         these fields belong to the Scaler alone and never race with a user's update
-- Events: deployment.scaled {desired} when desired changed
-- Reply:  {'ok', previous desired} | {'not_leader'} | {'not_found'}
local name = ARGV[4]
if redis.call('HGET', K.leader(ARGV[5]), 'token') ~= ARGV[6] then return { 'not_leader' } end
local key = K.deployment(name)
local prev = redis.call('HGET', key, 'desired')
if not prev then return { 'not_found' } end
redis.call('HSET', key, 'desired', ARGV[7], 'last_decision', ARGV[8], 'last_error', ARGV[9])
if prev ~= ARGV[7] then emit('deployment.scaled', name, 'desired', ARGV[7]) end
return { 'ok', prev }
