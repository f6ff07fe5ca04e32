-- leader_renew: extend the lease, proven by the fencing token (not by the key's existence).
-- KEYS:   1 events (routing only)
-- ARGV:   4 role; 5 fencing token; 6 lease ms
-- Writes: leader:<role> TTL
-- Events: none
-- Reply:  {'ok', deadline ms} | {'not_leader'}
local key = K.leader(ARGV[4])
if redis.call('HGET', key, 'token') ~= ARGV[5] then return { 'not_leader' } end
local ttl = tonumber(ARGV[6])
redis.call('PEXPIRE', key, ttl)
return { 'ok', now_ms() + ttl }
