-- uses: lib.lua
-- A conditional write of one pin's vector and metadata in one version.
--
-- KEYS[1]  p:v:vec:{PIN}
-- KEYS[2]  p:v:meta:{PIN}
-- KEYS[3]  p:v:ids:{T} (the ids set of the pin's slot)
-- KEYS[4]  p:tomb:{PIN}
-- ARGV[1]  mode: 'w' (a writer: never below the stored version) or 'r' (a refill: only
--          into an absent pin)
-- ARGV[2]  the record's pin version
-- ARGV[3]  the vector's bytes
-- ARGV[4]  the pin id
-- ARGV[5..] the meta hash's field/value pairs
-- returns: 1 if it wrote (never at or below the tombstone)
local v = ARGV[2]
local s = hget(KEYS[2], 'pin_version')
if cmp(get(KEYS[4]), v) < 0 and ((ARGV[1] == 'r' and s == nil) or
                                 (ARGV[1] == 'w' and cmp(s, v) <= 0)) then
  put_record(KEYS, ARGV)
  return 1
end
return 0
