-- rate_share: one Dispatch replica's refresh of its shares of callers' rate limits. Each
-- replica decides rate limits locally; this script, run in the background every refresh
-- interval, is the only place the replicas' shares meet. For each caller the replica reports
-- its demand (requests per second arriving there) and leases a share of the caller's rate
-- until lease_until: the shares of unexpired leases never sum above the rate, because a
-- replica is given at most what the other live leases leave.
--   Demand within the rate: each replica gets its demand plus an equal part (1 / live
--   replicas) of what is left over, so a replica a caller has not reached yet still finds room.
--   Demand above the rate: the rate is split in proportion to demand.
-- KEYS:   1 events (routing only)
-- ARGV:   4 replica id; 5 rate (requests per second, > 0); 6 lease ms; 7.. pairs (caller, demand)
-- Writes: rate_replicas (score = lease expiry; lapsed entries removed),
--         rate_share:<caller> (hash replica -> "demand grant lease_until_ms"; lapsed fields
--         removed; PEXPIRE twice the lease)
-- Events: none
-- Reply:  {'ok', live replicas, grant for each caller in order (requests per second, as text)}
local replica, rate, lease = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local lease_until = now + lease
redis.call('ZREMRANGEBYSCORE', K.rate_replicas, '-inf', now)
redis.call('ZADD', K.rate_replicas, lease_until, replica)
local replicas = redis.call('ZCARD', K.rate_replicas)
local reply = { 'ok', replicas }
for i = 7, #ARGV - 1, 2 do
  local caller, demand = ARGV[i], math.max(0, tonumber(ARGV[i + 1]) or 0)
  local key = K.rate_share(caller)
  local fields = redis.call('HGETALL', key)
  local others_grant, total_demand = 0, demand
  for j = 1, #fields, 2 do
    if fields[j] ~= replica then
      local d, g, u = string.match(fields[j + 1], '^(%S+) (%S+) (%S+)$')
      if u and tonumber(u) > now then
        others_grant = others_grant + tonumber(g)
        total_demand = total_demand + tonumber(d)
      else
        redis.call('HDEL', key, fields[j])
      end
    end
  end
  local target
  if total_demand <= rate then
    target = demand + (rate - total_demand) / replicas
  else
    target = rate * demand / total_demand
  end
  local grant = math.max(0, math.min(target, rate - others_grant))
  redis.call('HSET', key, replica, string.format('%.17g %.17g %d', demand, grant, lease_until))
  redis.call('PEXPIRE', key, 2 * lease)
  reply[#reply + 1] = string.format('%.17g', grant)
end
return reply
