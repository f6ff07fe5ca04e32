-- leader_acquire: take the leader lease of a role if nobody holds it. The lease is a hash with a
-- TTL; each new holder gets a larger fencing token, which scripts check before a leader's write.
-- A holder that asks again keeps its token and renews.
-- KEYS:   1 events
-- ARGV:   4 role; 5 holder id; 6 lease ms
-- Writes: leader:<role> {holder, token, since_ms} with PEXPIRE, leader_token:<role>
-- Events: leader.acquired {holder, token} (only on a change of holder)
-- Reply:  {'ok', token, deadline ms} | {'held', holder, token, deadline ms}
local role, holder, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
local key = K.leader(role)
local now = now_ms()
local cur = redis.call('HMGET', key, 'holder', 'token')
if cur[1] then
  if cur[1] ~= holder then
    return { 'held', cur[1], cur[2], now + redis.call('PTTL', key) }
  end
  redis.call('PEXPIRE', key, ttl)
  return { 'ok', cur[2], now + ttl }
end
local token = redis.call('INCR', K.leader_token(role))
redis.call('HSET', key, 'holder', holder, 'token', token, 'since_ms', now)
redis.call('PEXPIRE', key, ttl)
emit('leader.acquired', role, 'holder', holder, 'token', token)
return { 'ok', token, now + ttl }
