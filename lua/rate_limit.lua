-- rate_limit: one request against a caller's token bucket. The bucket refills at `rate` tokens
-- per second up to `burst`; a request takes one. Judged by the Redis clock, so every Dispatch
-- replica shares one bucket per caller.
-- KEYS:   1 events (routes the script to the namespace's slot; not written)
-- ARGV:   4 bucket id; 5 rate (tokens per second, > 0); 6 burst (whole tokens, >= 1)
-- Writes: ratelimit:<bucket> {tokens, at_ms}, expiring once it would be full again
-- Events: none
-- Reply:  {'ok', whole tokens left} | {'limited', milliseconds until a token is available}
local key = K.ratelimit(ARGV[4])
local rate, burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local b = redis.call('HMGET', key, 'tokens', 'at_ms')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local full_in_ms = math.ceil((burst - tokens) * 1000 / rate) + 1000
if tokens < 1 then
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at_ms', now)
  redis.call('PEXPIRE', key, full_in_ms)
  return { 'limited', math.ceil((1 - tokens) * 1000 / rate) }
end
tokens = tokens - 1
redis.call('HSET', key, 'tokens', tostring(tokens), 'at_ms', now)
redis.call('PEXPIRE', key, full_in_ms + math.ceil(1000 / rate))
return { 'ok', math.floor(tokens) }
