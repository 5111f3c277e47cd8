-- uses: lib.lua
-- A delete's end: the pin leaves every version where it is not newer, then the claim
-- is released as release.lua does (a tool's removal passes no token: no release).
--
-- KEYS[1]  p:tomb:{PIN}
-- KEYS[2]  p:wip:{PIN}
-- KEYS[3..] p:v:vec:{PIN}, p:v:meta:{PIN}, p:v:ids:{T} of each version, in threes
-- ARGV[1]  the writer's token ('' = no claim to release)
-- ARGV[2]  the delete's pin version ('' = remove whatever is stored)
-- ARGV[3]  the pin id
-- ARGV[4]  claim ttl, ms
-- returns: as release.lua
local v = ARGV[2]
for i = 3, #KEYS, 3 do
  if v == '' or cmp(hget(KEYS[i + 1], 'pin_version'), v) <= 0 then
    redis.call('DEL', KEYS[i], KEYS[i + 1])
    redis.call('SREM', KEYS[i + 2], ARGV[3])
  end
end
if ARGV[1] == '' then return 0 end
return release(KEYS[2], KEYS[1], ARGV[1], v, tonumber(ARGV[4]))
