-- Cancels a job: a queued one ends here (the worker that later reads its entry skips it), a
-- running one gets the flag its worker checks every step.
-- KEYS: job (hash), waiting (zset), recent (zset)
-- ARGV: id, cancelled status, ttl (s), now (ms), events channel, signals channel, keep recent
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HGET', KEYS[1], 'done') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'cancel', '1')
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'done', '1')
  redis.call('HDEL', KEYS[1], 'spec')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[7]) + 1))
else
  redis.call('PUBLISH', ARGV[6], 'cancel')
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 1
