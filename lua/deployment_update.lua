-- deployment_update: replace fields of an active deployment (its scaling policy, or its
-- backend_config when LoRA adapters are added or removed), optionally
-- only if the stored version is the expected one.
-- KEYS:   1 events
-- ARGV:   4 name; 5 expected version (0 = any); 6.. field, value pairs
-- Writes: deployment:<name> (fields, version + 1, updated_ms)
-- Events: deployment.updated {version}
-- Reply:  {'ok', version, now_ms} | {'not_found'} | {'wrong_state', status}
--         | {'stale_version', current}
local name = ARGV[4]
local key = K.deployment(name)
local cur = redis.call('HMGET', key, 'status', 'version')
if not cur[1] then return { 'not_found' } end
if cur[1] ~= 'active' then return { 'wrong_state', cur[1] } end
local expected = tonumber(ARGV[5])
if expected ~= 0 and tonumber(cur[2]) ~= expected then return { 'stale_version', cur[2] } end
local now = now_ms()
local pairs_ = {}
for i = 6, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
if #pairs_ > 0 then redis.call('HSET', key, unpack(pairs_)) end
redis.call('HSET', key, 'updated_ms', now)
local v = redis.call('HINCRBY', key, 'version', 1)
emit('deployment.updated', name, 'version', v)
return { 'ok', v, now }
