-- demand_event: a request for a model found no ready instance. Appended to the event stream at
-- once, so the Scaler starts an instance without waiting for its next tick or the next batched
-- demand report.
-- KEYS:   1 events
-- ARGV:   4 model; 5 requests queued for it on this replica; 6 reporter id; 7 W3C traceparent of
--         the waiting request ('' if none), so the Scaler's decision joins its trace
-- Writes: nothing else
-- Events: demand {queued, reporter, traceparent}
-- Reply:  {'ok'}
emit('demand', ARGV[4], 'queued', ARGV[5], 'reporter', ARGV[6], 'traceparent', ARGV[7] or '')
return { 'ok' }
