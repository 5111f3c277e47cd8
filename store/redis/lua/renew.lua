-- uses: lib.lua
-- Renews a claim that is still held while its Milvus write runs (its version and mark
-- kept, its time now), so a slow write never outlives its claim.
--
-- KEYS[1]  p:wip:{PIN}
-- ARGV[1]  the writer's token
-- ARGV[2]  claim ttl, ms
-- returns: 1 if the claim was held
local e = redis.call('HGET', KEYS[1], ARGV[1])
if e == false then return 0 end
local pv, _, d = parse(e)
if pv == nil then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], pv .. ':' .. now_ms() .. ':' .. (d and '1' or '0'))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
