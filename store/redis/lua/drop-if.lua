-- uses: lib.lua
-- A repair's delete of an entry Milvus does not have: only if it still holds the
-- version the repair saw (a worker's write meanwhile is kept).
--
-- KEYS[1]  p:v:vec:{PIN}
-- KEYS[2]  p:v:meta:{PIN}
-- KEYS[3]  p:v:ids:{T}
-- ARGV[1]  the pin version the repair saw
-- ARGV[2]  the pin id
-- returns: 1 if it removed the entry
if hget(KEYS[2], 'pin_version') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
return 0
