-- empty: does nothing and answers ok. The cheapest script call there is (Redis's own cost of
-- running a script, plus this prelude): benchmarks set a transition beside it to tell what a
-- script call costs from what the transition's own work costs.
-- KEYS:   1 events (routing only)
-- ARGV:   none of its own
-- Writes: nothing
-- Events: none
-- Reply:  {'ok'}
return { 'ok' }
