-- leader_release: give up the lease at once (clean shutdown), so a successor need not wait
-- for the TTL.
-- KEYS:   1 events
-- ARGV:   4 role; 5 fencing token
-- Writes: deletes leader:<role>
-- Events: leader.released {token}
-- Reply:  {'ok'} | {'not_leader'}
local key = K.leader(ARGV[4])
if redis.call('HGET', key, 'token') ~= ARGV[5] then return { 'not_leader' } end
redis.call('DEL', key)
emit('leader.released', ARGV[4], 'token', ARGV[5])
return { 'ok' }
