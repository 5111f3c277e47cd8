-- The batch form of a per-pin script: `store.redis_scripts` wraps the script's body in
-- `local function one(KEYS, ARGV) ... end` after lib.lua and puts this after it, so one
-- EVALSHA runs the script once per pin of a batch, in order, each its own
-- compare-and-set (a single node only: a cluster's pins live on several nodes).
--
-- ARGV: n; then n pairs (number of keys, number of args) of the calls; then every
--       call's args, in order
-- KEYS: every call's keys, in order
-- returns: one reply per call (a nil reply as false)
local n = tonumber(ARGV[1])
local out = {}
local k, a = 0, 1 + 2 * n
for i = 1, n do
  local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local r = one(keys, args)
  if r == nil then r = false end
  out[i] = r
end
return out
