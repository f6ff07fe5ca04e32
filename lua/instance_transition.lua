-- instance_transition: move an instance to loading | ready | draining | stopped | failed.
-- Who may ask, and from which states, is the table RULES below. A worker proves itself with
-- its current epoch and may only report on its own instances; the Scaler proves leadership
-- with its fencing token. Optionally sends the instance's worker a command in the same step
-- (e.g. drain together with the move to draining).
-- KEYS:   1 events
-- ARGV:   4 instance id; 5 target state; 6 actor: 'worker' | 'leader'; 7 worker id or leader
--         role; 8 epoch or fencing token; 9 reason; 10 command id ('' for none); 11 command body
-- Writes: instance:<id> (status, reason, version + 1; expires once terminal), its indexes,
--         free_gpus:<worker> when terminal, commands:<worker> when a command is given
-- Events: instance.<state> {model, worker, version, reason}
-- Reply:  {'ok', version} | {'noop', version} (already in that state) | {'bad_transition'}
--         | {'not_allowed'} (actor may not ask this) | {'not_found'}
--         | {'wrong_worker', owner} | {'stale_epoch', current} | {'worker_lost'}
--         | {'not_leader'} | {'wrong_state', status}
local RULES = {
  loading = { from = { pending = true }, by = { worker = true } },
  ready = { from = { pending = true, loading = true }, by = { worker = true } },
  draining = { from = { pending = true, loading = true, ready = true }, by = { leader = true } },
  stopped = { from = LIVE, by = { worker = true, leader = true } },
  failed = { from = LIVE, by = { worker = true, leader = true } },
}
local id, to, actor, who, proof = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rule = RULES[to]
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
elseif redis.call('HGET', K.leader(who), 'token') ~= proof then
  return { 'not_leader' }
end
if rec[1] == to then return { 'noop', rec[4] } end
if not rule.from[rec[1]] then return { 'wrong_state', rec[1] } end
local v = instance_move(id, rec[1], rec[2], rec[3], to, ARGV[9], now_ms())
if ARGV[10] ~= '' then send_command(rec[3], ARGV[10], ARGV[11]) end
return { 'ok', v }
