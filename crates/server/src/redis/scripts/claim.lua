-- A worker received a job's stream entry: moves it from waiting to running and counts the
-- delivery. Returns nil when the job has ended meanwhile (cancelled while queued) or its
-- record is gone, so that the worker acknowledges the entry and moves on.
-- KEYS: job (hash), waiting (zset), running (zset)
-- ARGV: id, now (ms)
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'done') == '1' then
  return nil
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
local f = redis.call('HMGET', KEYS[1], 'meta', 'spec', 'cancel', 'entry')
return {f[1], f[2], f[3] or '', f[4], deliveries}
