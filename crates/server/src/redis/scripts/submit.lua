-- Queues a job unless the queue is full: its record, its place in line, its stream entry.
-- KEYS: waiting (zset), queue (stream), job (hash), seq (counter)
-- ARGV: id, capacity, meta, spec, status, model
-- Sent again after a dropped connection: the job is queued already.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {tonumber(redis.call('HGET', KEYS[3], 'seq')), redis.call('ZRANK', KEYS[1], ARGV[1]) or 0}
end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[2]) then
  return {-1, waiting}
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[3], 'meta', ARGV[3], 'spec', ARGV[4], 'status', ARGV[5], 'v', 1,
  'seq', seq, 'deliveries', 0)
redis.call('ZADD', KEYS[1], seq, ARGV[1])
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'model', ARGV[6])
redis.call('HSET', KEYS[3], 'entry', entry)
return {seq, waiting}
