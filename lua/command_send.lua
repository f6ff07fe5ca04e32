-- command_send: append a command to a worker's command stream and wake the registry replicas.
-- KEYS:   1 events (routing only)
-- ARGV:   4 worker id; 5 command id; 6 command body
-- Writes: commands:<worker>, commands_notify
-- Events: none (the command stream is its own log)
-- Reply:  {'ok', stream id}
return { 'ok', send_command(ARGV[4], ARGV[5], ARGV[6]) }
