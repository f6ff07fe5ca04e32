-- instance_create: the Scaler leader places a new instance on a ready worker, reserving its
-- GPUs, and sends the worker the start command in the same step (so a crash in between can
-- neither lose the command nor leave an instance nobody was told to start).
-- KEYS:   1 events
-- ARGV:   4 instance id; 5 model; 6 worker id; 7 leader role; 8 fencing token; 9 GPU indexes
--         (csv, at least one); 10 command id; 11 command body (encoded StartInstance)
-- Writes: instance:<id> (status pending, version 1), instances:status:pending,
--         instances:model:<model>, instances:worker:<worker>, free_gpus:<worker>,
--         commands:<worker>, commands_notify
-- Events: instance.pending {model, worker, version}
-- Reply:  {'ok', version} | {'not_leader'} | {'not_found'} (deployment)
--         | {'wrong_state', deployment status} | {'worker_not_found'}
--         | {'worker_not_ready', worker status} | {'already_exists'} | {'gpu_busy', index}
if redis.call('HGET', K.leader(ARGV[7]), 'token') ~= ARGV[8] then return { 'not_leader' } end
return place_instance(ARGV[4], ARGV[5], ARGV[6], ARGV[9], ARGV[10], ARGV[11])
