-- uses: lib.lua
-- A writer's claim on one pin before its Milvus write (renewed before each retry).
-- Key names: store/redis_keys.py.
--
-- KEYS[1]  p:tomb:{PIN}
-- KEYS[2]  p:wip:{PIN}
-- KEYS[3..] p:v:meta:{PIN} of each version written
-- ARGV[1]  op: 'u' (upsert) or 'd' (delete)
-- ARGV[2]  the writer's token
-- ARGV[3]  the event's pin version
-- ARGV[4]  tombstone ttl, s
-- ARGV[5]  claim ttl, ms
-- returns: one flag per version: 1 = this writer may write it (nothing newer stored,
--          no newer delete). A delete's claim raises the tombstone first. A renewed
--          claim keeps the entry's mark.
local v = ARGV[3]
local tomb = get(KEYS[1])
local out, any = {}, 0
for i = 3, #KEYS do
  local ok = cmp(hget(KEYS[i], 'pin_version'), v) <= 0 and
    (cmp(tomb, v) < 0 or (ARGV[1] == 'd' and cmp(tomb, v) == 0))
  out[#out + 1] = ok and 1 or 0
  if ok then any = 1 end
end
if ARGV[1] == 'd' and cmp(tomb, v) <= 0 then
  if cmp(tomb, v) < 0 then redis.call('SET', KEYS[1], v, 'EX', ARGV[4]) end
  any = 1
end
if any == 1 then
  local d = '0'
  local old = redis.call('HGET', KEYS[2], ARGV[2])
  if old then local _, _, od = parse(old); if od then d = '1' end end
  redis.call('HSET', KEYS[2], ARGV[2], v .. ':' .. now_ms() .. ':' .. d)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return out
