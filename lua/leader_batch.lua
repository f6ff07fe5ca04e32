-- leader_batch: many of the Scaler leader's writes of one pass in one call, each applied exactly
-- as its own script applies it: instance_create ('place'), instance_transition as the leader
-- ('move'), deployment_set_desired ('desired') and deployment_set_unplaceable ('unplaceable').
-- Each item checks its own preconditions; a refused item writes nothing and the others still
-- apply, in order. The fencing token is checked once, first: nothing else runs while a script
-- does, so it holds for every item, and a deposed leader's call writes nothing at all. The
-- caller keeps a call small (kvstore sends at most a few hundred items per call) so Redis is
-- never held for long.
-- KEYS:   1 events
-- ARGV:   4 leader role; 5 fencing token; 6.. the items, each an op and its arguments:
--         'place' instance id, model, worker id, GPU indexes (csv), command id, command body
--         'move' instance id, target state, reason, command id ('' for none), command body
--         'desired' name, desired, decision (JSON), last_error
--         'unplaceable' name, reason ('' = placeable again)
-- Writes: what each item's own script writes
-- Events: what each item's own script emits, in item order
-- Reply:  {'ok', item reply, ...}, one reply per item as its own script gives it (not_leader
--         aside) | {'not_leader'} | {'bad_item', position} (nothing written)
local role, token = ARGV[4], ARGV[5]
if redis.call('HGET', K.leader(role), 'token') ~= token then return { 'not_leader' } end
local ARITY = { place = 6, move = 5, desired = 4, unplaceable = 2 }
-- Every item is checked for shape before any is applied: a malformed call writes nothing.
local i = 6
while i <= #ARGV do
  local n = ARITY[ARGV[i]]
  if not n or i + n > #ARGV then return { 'bad_item', i } end
  i = i + n + 1
end
local out = { 'ok' }
-- One clock reading for the call: its items happen at one instant, as they would one after
-- another within the same millisecond or so.
local now = now_ms()
i = 6
while i <= #ARGV do
  local op, a = ARGV[i], i + 1
  if op == 'place' then
    out[#out + 1] = place_instance(ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
      ARGV[a + 5], now)
  elseif op == 'move' then
    -- The token was checked above (nil: not again per item).
    out[#out + 1] = move_instance(ARGV[a], ARGV[a + 1], 'leader', role, nil, ARGV[a + 2],
      ARGV[a + 3], ARGV[a + 4], now)
  elseif op == 'desired' then
    out[#out + 1] = set_desired(ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  else
    out[#out + 1] = set_unplaceable(ARGV[a], ARGV[a + 1])
  end
  i = a + ARITY[op]
end
return out
