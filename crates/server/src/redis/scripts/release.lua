-- A stopping worker gives a job back: queued again in its old place, its stream entry made
-- idle past any visibility timeout so that the next worker claims it at once, and the
-- delivery not counted against the job.
-- KEYS: job (hash), running (zset), waiting (zset), queue (stream)
-- ARGV: id, queued status, entry, consumer, group, events channel
if redis.call('HGET', KEYS[1], 'done') == '1' then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'seq'), ARGV[1])
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('HDEL', KEYS[1], 'preview')
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('XCLAIM', KEYS[4], ARGV[5], ARGV[4], 0, ARGV[3], 'IDLE', 1000000000, 'JUSTID')
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
