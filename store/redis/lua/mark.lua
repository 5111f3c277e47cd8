-- Marks a version's cache complete (RedisCache.mark_complete): only a registered
-- version, so a dropped one is not brought back as a hash of one field.
--
-- KEYS[1]  {p}:version:<v>
-- ARGV[1]  the mark ('complete')
-- returns: 1 if the version is registered (and now marked)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'cache', ARGV[1])
  return 1
end
return 0
