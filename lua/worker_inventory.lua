-- worker_inventory: replace what a worker reports it holds (checkpoints and their tiers, host
-- memory, bandwidths), e.g. after loading a model moved its checkpoint into GPU memory. The GPU
-- set is fixed per registration and is not changed here.
-- KEYS:   1 events
-- ARGV:   4 worker id; 5 epoch; 6.. field, value pairs (host_memory_bytes, checkpoints,
--         bandwidths)
-- Writes: worker:<id> (fields, version + 1)
-- Events: worker.inventory {version}
-- Reply:  {'ok', version} | {'not_found'} | {'stale_epoch', current} | {'lost'}
local id = ARGV[4]
local key = K.worker(id)
local w = redis.call('HMGET', key, 'epoch', 'status')
if not w[2] then return { 'not_found' } end
if w[1] ~= ARGV[5] then return { 'stale_epoch', w[1] } end
if w[2] == 'lost' then return { 'lost' } end
local pairs_ = {}
for i = 6, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
if #pairs_ > 0 then redis.call('HSET', key, unpack(pairs_)) end
local v = redis.call('HINCRBY', key, 'version', 1)
emit('worker.inventory', id, 'version', v)
return { 'ok', v }
