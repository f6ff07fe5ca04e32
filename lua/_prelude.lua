-- Prelude: what of it a script in this folder uses is prepended to it by kvstore (scripts.rs,
-- `assemble`): Redis builds all of it anew on every call, so a script carries only the key names
-- and helpers it names. Keep to the shape that relies on: each `local` starts its line, a
-- function's closing `end` and K's closing `}` stand alone at the start of a line, each K entry
-- is one line, and a script reaches a key entry only as `K.<entry>`. Never run alone.
--
-- Calling convention shared by every script:
--   KEYS[1]  the event stream ({ns}:events). Declared so the script is routed to the node that
--            owns the namespace's hash tag; every other key shares that tag (same cluster slot).
--   ARGV[1]  the namespace root, e.g. "{sllm}:"; every key is built from it by K below, which
--            mirrors kvstore/src/keys.rs (a test asserts the two agree).
--   ARGV[2]  approximate MAXLEN of the event stream.
--   ARGV[3]  milliseconds a terminal instance record is kept before it expires.
--   ARGV[4..] the script's own arguments, listed in its header.
-- Replies are arrays whose first element is a code: 'ok' or 'noop' on success, anything else is a
-- refusal and nothing was written.

local ROOT = ARGV[1]
local EVENTS_MAXLEN = ARGV[2]
local TERMINAL_TTL_MS = tonumber(ARGV[3])

local K = {
  events_seq = ROOT .. 'events:seq',
  deployments = ROOT .. 'deployments',
  lease_deadlines = ROOT .. 'lease_deadlines',
  lost_workers = ROOT .. 'lost_workers',
  workers = ROOT .. 'workers',
  commands_notify = ROOT .. 'commands_notify',
  demand_reporters = ROOT .. 'demand_reporters',
  dispatchers = ROOT .. 'dispatchers',
  dispatcher_endpoints = ROOT .. 'dispatcher_endpoints',
  unplaceable = ROOT .. 'unplaceable',
  deployment = function(name) return ROOT .. 'deployment:' .. name end,
  deployments_status = function(s) return ROOT .. 'deployments:status:' .. s end,
  model_instances = function(name) return ROOT .. 'instances:model:' .. name end,
  worker = function(id) return ROOT .. 'worker:' .. id end,
  workers_status = function(s) return ROOT .. 'workers:status:' .. s end,
  worker_instances = function(id) return ROOT .. 'instances:worker:' .. id end,
  free_gpus = function(id) return ROOT .. 'free_gpus:' .. id end,
  address = function(a) return ROOT .. 'address:' .. a end,
  instance = function(id) return ROOT .. 'instance:' .. id end,
  instances_status = function(s) return ROOT .. 'instances:status:' .. s end,
  commands = function(id) return ROOT .. 'commands:' .. id end,
  commands_acked = function(id) return ROOT .. 'commands_acked:' .. id end,
  leader = function(role) return ROOT .. 'leader:' .. role end,
  leader_token = function(role) return ROOT .. 'leader_token:' .. role end,
  demand = function(reporter) return ROOT .. 'demand:' .. reporter end,
  ratelimit = function(bucket) return ROOT .. 'ratelimit:' .. bucket end,
  rate_replicas = ROOT .. 'rate_replicas',
  rate_share = function(caller) return ROOT .. 'rate_share:' .. caller end,
  lineage = ROOT .. 'lineage',
  recovering = ROOT .. 'recovering',
}

-- Milliseconds since the Unix epoch, from the Redis server's clock: every lease in the cluster
-- is judged by one clock, whatever the skew between service hosts.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Appends one event. Every event carries a gap-free sequence number so a reader can tell that
-- the stream was trimmed past it and it must re-read full state.
local function emit(kind, id, ...)
  local seq = redis.call('INCR', K.events_seq)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'seq', seq, 'kind', kind, 'id', id, ...)
  return seq
end

-- Appends a command to a worker's command stream and wakes the registry replicas.
local function send_command(worker, command_id, body)
  local id = redis.call('XADD', K.commands(worker), '*', 'cid', command_id, 'body', body)
  redis.call('XADD', K.commands_notify, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'worker', worker, 'id', id)
  return id
end

local function split_csv(s)
  local out = {}
  if s then
    for part in string.gmatch(s, '[^,]+') do out[#out + 1] = part end
  end
  return out
end

local TERMINAL = { stopped = true, failed = true }
local LIVE = { pending = true, loading = true, ready = true, draining = true, lost = true }

-- Moves instance `id` from status `from` to `to`, keeping its status, model and worker indexes
-- and its worker's free GPUs in step, and emits `instance.<to>`. Returns the new version.
local function instance_move(id, from, model, worker, to, reason, now)
  local key = K.instance(id)
  redis.call('SREM', K.instances_status(from), id)
  local v = redis.call('HINCRBY', key, 'version', 1)
  redis.call('HSET', key, 'status', to, 'updated_ms', now, 'reason', reason or '')
  if TERMINAL[to] then
    redis.call('SREM', K.model_instances(model), id)
    redis.call('SREM', K.worker_instances(worker), id)
    for _, g in ipairs(split_csv(redis.call('HGET', key, 'gpus'))) do
      redis.call('SADD', K.free_gpus(worker), g)
    end
    redis.call('PEXPIRE', key, TERMINAL_TTL_MS)
  else
    redis.call('SADD', K.instances_status(to), id)
  end
  emit('instance.' .. to, id, 'model', model, 'worker', worker, 'version', v, 'reason', reason or '')
  return v
end

-- ---------------------------------------------------------------------------------------------

-- Names the Redis state, and tells a Redis that lost its state from one that never had any.
-- `candidate` becomes the lineage when there is none. A caller that `known` a lineage which is
-- now gone has seen Redis come back empty: the recovery window opens (the `recovering` key, for
-- `window_ms`), in which workers' reports of instances with no record rebuild those records.
-- Returns the lineage now in force.
local function ensure_lineage(candidate, known, window_ms)
  local current = redis.call('GET', K.lineage)
  if current then return current end
  redis.call('SET', K.lineage, candidate)
  if known ~= '' then
    redis.call('SET', K.recovering, known, 'PX', window_ms)
    emit('store.recovering', candidate, 'lost', known, 'window_ms', window_ms)
  end
  return candidate
end
