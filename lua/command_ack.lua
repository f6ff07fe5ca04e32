-- command_ack: a worker has handled every command of its stream up to and including this id.
-- Advances the worker's cursor (never backwards) and trims what is acknowledged, so a session
-- that moves to another replica resumes after the last acknowledged command: nothing lost,
-- nothing delivered twice once acknowledged.
-- KEYS:   1 events (routing only)
-- ARGV:   4 worker id; 5 stream id
-- Writes: commands_acked:<worker>, commands:<worker>
-- Events: none
-- Reply:  {'ok', cursor} | {'noop', cursor} (already acknowledged)
local worker, id = ARGV[4], ARGV[5]
local function parse(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local cursor_key = K.commands_acked(worker)
local cur = redis.call('GET', cursor_key) or '0-0'
local ams, aseq = parse(id)
local cms, cseq = parse(cur)
if ams < cms or (ams == cms and aseq <= cseq) then return { 'noop', cur } end
redis.call('SET', cursor_key, id)
redis.call('XTRIM', K.commands(worker), 'MINID', id)
redis.call('XDEL', K.commands(worker), id)
return { 'ok', id }
