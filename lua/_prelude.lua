-- Prelude: what of it a script in this folder uses is prepended to it by kvstore (scripts.rs,
-- `assemble`): Redis builds all of it anew on every call, so a script carries only the key names
-- and helpers it names. Keep to the shape that relies on: each `local` starts its line, a
-- function's closing `end`, K's closing `}` and that of any other table spanning lines stand
-- alone at the start of a line, each K entry is one line, and a script reaches a key entry only
-- as `K.<entry>`. Never run alone.
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

-- The transitions below are shared by a script of their own (named in each) and by
-- leader_batch, which applies many of the leader's in one call. Each checks its own
-- preconditions and writes nothing when one fails; the leader's fencing token is checked by the
-- caller (instance moves check it themselves, as workers move instances too).

-- instance_create: places instance `id` of `model` on `worker`, reserving `gpus_csv`, and sends
-- the start command. Reply: {'ok', 1} | {'not_found'} | {'wrong_state', deployment status}
-- | {'worker_not_found'} | {'worker_not_ready', status} | {'already_exists'} | {'gpu_busy', g}
-- `now` is the Redis clock in ms (read here when nil).
local function place_instance(id, model, worker, gpus_csv, command_id, body, now)
  local dstatus = redis.call('HGET', K.deployment(model), 'status')
  if not dstatus then return { 'not_found' } end
  if dstatus ~= 'active' then return { 'wrong_state', dstatus } end
  local wstatus = redis.call('HGET', K.worker(worker), 'status')
  if not wstatus then return { 'worker_not_found' } end
  if wstatus ~= 'ready' then return { 'worker_not_ready', wstatus } end
  local key = K.instance(id)
  if redis.call('EXISTS', key) == 1 then return { 'already_exists' } end
  local gpus = split_csv(gpus_csv)
  local free = K.free_gpus(worker)
  for _, g in ipairs(gpus) do
    if redis.call('SISMEMBER', free, g) == 0 then return { 'gpu_busy', g } end
  end
  for _, g in ipairs(gpus) do redis.call('SREM', free, g) end
  now = now or now_ms()
  redis.call('HSET', key, 'instance_id', id, 'model', model, 'worker_id', worker,
    'status', 'pending', 'gpus', gpus_csv, 'reason', '', 'version', 1, 'created_ms', now,
    'updated_ms', now)
  redis.call('SADD', K.instances_status('pending'), id)
  redis.call('SADD', K.model_instances(model), id)
  redis.call('SADD', K.worker_instances(worker), id)
  send_command(worker, command_id, body)
  emit('instance.pending', id, 'model', model, 'worker', worker, 'version', 1, 'reason', '')
  return { 'ok', 1 }
end

-- Who may move an instance to which state, and from which states (instance_transition).
local MOVES = {
  loading = { from = { pending = true }, by = { worker = true } },
  ready = { from = { pending = true, loading = true }, by = { worker = true } },
  draining = { from = { pending = true, loading = true, ready = true }, by = { leader = true } },
  stopped = { from = LIVE, by = { worker = true, leader = true } },
  failed = { from = LIVE, by = { worker = true, leader = true } },
}

-- instance_transition: moves instance `id` to `to` for `actor` ('worker' proving itself with
-- its epoch, or 'leader' with its fencing token: `who` is the worker id or the leader role),
-- by MOVES, sending its worker `command_id` with `body` unless `command_id` is ''. A leader's
-- `proof` nil means its caller checked the token already; `now` as for place_instance.
-- Reply: {'ok', version} | {'noop', version} | {'bad_transition'} | {'not_allowed'}
-- | {'not_found'} | {'wrong_worker', owner} | {'stale_epoch', current} | {'worker_lost'}
-- | {'not_leader'} | {'wrong_state', status}
local function move_instance(id, to, actor, who, proof, reason, command_id, body, now)
  local rule = MOVES[to]
  if not rule then return { 'bad_transition' } end
  if not rule.by[actor] then return { 'not_allowed' } end
  local key = K.instance(id)
  local rec = redis.call('HMGET', key, 'status', 'model', 'worker_id', 'version')
  if not rec[1] then return { 'not_found' } end
  if actor == 'worker' then
    if rec[3] ~= who then return { 'wrong_worker', rec[3] } end
    local w = redis.call('HMGET', K.worker(who), 'epoch', 'status')
    if w[1] ~= proof then return { 'stale_epoch', w[1] or '0' } end
    if w[2] == 'lost' then return { 'worker_lost' } end
  elseif proof ~= nil and redis.call('HGET', K.leader(who), 'token') ~= proof then
    return { 'not_leader' }
  end
  if rec[1] == to then return { 'noop', rec[4] } end
  if not rule.from[rec[1]] then return { 'wrong_state', rec[1] } end
  local v = instance_move(id, rec[1], rec[2], rec[3], to, reason, now or now_ms())
  if command_id ~= '' then send_command(rec[3], command_id, body) end
  return { 'ok', v }
end

-- deployment_set_desired: records model `name`'s desired count, the decision behind it and the
-- error that stopped it starting. Reply: {'ok', previous desired} | {'not_found'}
local function set_desired(name, desired, decision, last_error)
  local key = K.deployment(name)
  local prev = redis.call('HGET', key, 'desired')
  if not prev then return { 'not_found' } end
  redis.call('HSET', key, 'desired', desired, 'last_decision', decision, 'last_error', last_error)
  if prev ~= desired then emit('deployment.scaled', name, 'desired', desired) end
  return { 'ok', prev }
end

-- deployment_set_unplaceable: marks model `name` unplaceable for `reason`, or clears the mark
-- when `reason` is ''. Reply: {'ok', '1'} changed | {'noop', '0'} unchanged | {'not_found'}
local function set_unplaceable(name, reason)
  local current = redis.call('HGET', K.unplaceable, name)
  if reason == '' then
    if not current then return { 'noop', '0' } end
    redis.call('HDEL', K.unplaceable, name)
  else
    -- Only a deployment that exists is marked: a mark must never outlive its deployment.
    if redis.call('EXISTS', K.deployment(name)) == 0 then return { 'not_found' } end
    if current == reason then return { 'noop', '0' } end
    redis.call('HSET', K.unplaceable, name, reason)
  end
  emit('deployment.unplaceable', name, 'reason', reason)
  return { 'ok', '1' }
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
