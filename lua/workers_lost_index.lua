-- workers_lost_index: puts every lost worker missing from the lost_workers index into it, with
-- the time it was lost (now, if its record does not say), so that workers lost before the index
-- existed are removed after their retention too. Run once when a registry replica starts, never
-- per request or tick.
-- KEYS:   1 events (routing only)
-- ARGV:   none of its own
-- Writes: lost_workers (only entries that were missing)
-- Events: none
-- Reply:  {'ok', entries added}
local now = now_ms()
local added = 0
for _, id in ipairs(redis.call('SMEMBERS', K.workers_status('lost'))) do
  if not redis.call('ZSCORE', K.lost_workers, id) then
    local lost_ms = tonumber(redis.call('HGET', K.worker(id), 'lost_ms')) or now
    redis.call('ZADD', K.lost_workers, lost_ms, id)
    added = added + 1
  end
end
return { 'ok', added }
