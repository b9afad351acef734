-- A worker's progress: the status (and preview) of a running job, unless it has ended.
-- KEYS: job (hash)
-- ARGV: id, status, preview ('' = unchanged), events channel
if redis.call('HGET', KEYS[1], 'done') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'preview', ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
