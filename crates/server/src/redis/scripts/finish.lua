-- A job ended: its final status and images, written once. A second worker finishing the same
-- job (it was delivered again after the first seemed dead) changes nothing; either way the
-- stream entry is acknowledged and removed.
-- KEYS: job (hash), running (zset), recent (zset), queue (stream), png keys...
-- ARGV: id, status, entry, ttl (s), now (ms), events channel, keep recent, group, pngs...
local first = 0
if redis.call('HGET', KEYS[1], 'done') ~= '1' then
  first = 1
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'done', '1')
  redis.call('HDEL', KEYS[1], 'spec', 'preview')
  redis.call('HINCRBY', KEYS[1], 'v', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  for i = 5, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i + 4], 'EX', ARGV[4])
  end
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[7]) + 1))
  redis.call('PUBLISH', ARGV[6], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[8], ARGV[3])
  redis.call('XDEL', KEYS[4], ARGV[3])
end
return first
