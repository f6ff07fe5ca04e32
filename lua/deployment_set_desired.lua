-- deployment_set_desired: the Scaler leader records how many instances a model should have,
-- the decision behind it, and (optionally) an error that stopped it starting the model.
-- Fenced: a deposed leader's write is refused.
-- KEYS:   1 events
-- ARGV:   4 name; 5 leader role; 6 fencing token; 7 desired; 8 decision (JSON); 9 last_error
-- Writes: deployment:<name> (desired, last_decision, last_error); the version is not bumped:
--         these fields belong to the Scaler alone and never race with a user's update
-- Events: deployment.scaled {desired} when desired changed
-- Reply:  {'ok', previous desired} | {'not_leader'} | {'not_found'}
if redis.call('HGET', K.leader(ARGV[5]), 'token') ~= ARGV[6] then return { 'not_leader' } end
return set_desired(ARGV[4], ARGV[7], ARGV[8], ARGV[9])
