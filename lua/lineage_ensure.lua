-- lineage_ensure: names the Redis state if it has no name yet (a registry replica calls it at
-- start, and its register calls do the same in passing). See ensure_lineage in the prelude.
-- KEYS:   1 events
-- ARGV:   4 candidate lineage; 5 lineage the caller knew ('' for none); 6 recovery window ms
-- Writes: lineage (when absent); recovering (PX window) when the caller knew a lineage that
--         is gone
-- Events: store.recovering {lost, window_ms} when the recovery window opens
-- Reply:  {'ok', lineage}
return { 'ok', ensure_lineage(ARGV[4], ARGV[5], ARGV[6]) }
