-- Functions every per-pin script shares (`store.redis_scripts` puts this file in front
-- of each script that says "uses: lib.lua"; it is no script of its own).
--
-- Pin versions travel and are stored as decimal strings and compared as such
-- (exact up to 2**62; Lua's numbers are doubles). A writer's entry in a pin's
-- in-flight hash (p:wip:{PIN}, store/redis_keys.py) is "<pin version>:<ms>:<f>":
-- the server time of its last claim, and f = 1 once another writer's release (or an
-- expired claim) marked it as possibly overwritten in Milvus. A release replaces it
-- with "R<n>:<ms>", its answer, kept for the writer ttl: a release run again because
-- its reply was lost (a reset connection, a timeout after the server ran it) answers
-- the same. docs/integration.md, "Concurrent writers", states the protocol.

-- compares two decimal strings (nil sorts first)
local function cmp(a, b)
  if a == nil then return b == nil and 0 or -1 end
  if b == nil then return 1 end
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
-- stores a pin's record: vector (keys[1]), meta hash (keys[2], argv[5..]), id set
-- (keys[3], argv[4]); the layout of write.lua and replace.lua
local function put_record(keys, argv)
  redis.call('SET', keys[1], argv[3])
  redis.call('HSET', keys[2], unpack(argv, 5))
  redis.call('SADD', keys[3], argv[4])
end
local function get(key) local x = redis.call('GET', key); if x then return x end end
local function hget(key, f) local x = redis.call('HGET', key, f); if x then return x end end
-- a claim entry: pin version, time of its last claim, whether it was marked
local function parse(e)
  local pv, at, d = string.match(e, '^(%d+):(%d+):([01])$')
  if pv == nil then return nil end
  return pv, tonumber(at), d == '1'
end
-- marks every other writer at version v or above as possibly overwritten
local function flag_from(key, v, except)
  local e = redis.call('HGETALL', key)
  for i = 1, #e, 2 do
    if e[i] ~= except then
      local pv, at, d = parse(e[i + 1])
      if pv ~= nil and not d and cmp(pv, v) >= 0 then
        redis.call('HSET', key, e[i], pv .. ':' .. at .. ':1')
      end
    end
  end
end
-- a release's kept answer: what it returned, and when
local function released(e)
  local n, at = string.match(e, '^R(%d+):(%d+)$')
  if n == nil then return nil end
  return tonumber(n), tonumber(at)
end
-- writers of version v or older still in flight; drops expired claims (marking the
-- writers above them) and expired release answers
local function older(key, v, ttl)
  local now, n = now_ms(), 0
  local e = redis.call('HGETALL', key)
  for i = 1, #e, 2 do
    local pv, at = parse(e[i + 1])
    if pv == nil then
      local _, rat = released(e[i + 1])
      if rat == nil or rat < now - ttl then redis.call('HDEL', key, e[i]) end
    elseif at < now - ttl then
      redis.call('HDEL', key, e[i])
      flag_from(key, pv, e[i])
    elseif cmp(pv, v) <= 0 then n = n + 1 end
  end
  return n
end
-- ends token's claim: > 0 when it must write again (see release.lua)
local function release(wip, tomb, token, v, ttl)
  local mine = redis.call('HGET', wip, token)
  if mine then
    local was = released(mine)
    if was ~= nil then return was end
  end
  local dirty = false
  if mine then
    local _, _, d = parse(mine)
    dirty = d
    redis.call('HDEL', wip, token)
    flag_from(wip, v, token)
  end
  local n = 0
  if cmp(get(tomb), v) <= 0 then n = older(wip, v, ttl) + (dirty and 1 or 0) end
  redis.call('HSET', wip, token, 'R' .. n .. ':' .. now_ms())
  redis.call('PEXPIRE', wip, ttl)
  return n
end
-- live claims in a wip hash (not the kept release answers)
local function claims(key)
  local n = 0
  for _, e in ipairs(redis.call('HVALS', key)) do
    if parse(e) ~= nil then n = n + 1 end
  end
  return n
end
