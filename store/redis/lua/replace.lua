-- uses: lib.lua
-- A repair's compare-and-set (`store verify --repair`): Milvus's record over what Redis
-- held when the repair read it. It may move a pin back (the record is Milvus's, read
-- just before), never at or below the tombstone.
--
-- KEYS[1]  p:v:vec:{PIN}
-- KEYS[2]  p:v:meta:{PIN}
-- KEYS[3]  p:v:ids:{T}
-- KEYS[4]  p:tomb:{PIN}
-- ARGV[1]  the pin version the repair saw ('' = absent)
-- ARGV[2]  the record's pin version
-- ARGV[3]  the vector's bytes
-- ARGV[4]  the pin id
-- ARGV[5..] the meta hash's field/value pairs
-- returns: 1 if it wrote
local s = hget(KEYS[2], 'pin_version')
if ((ARGV[1] == '' and s == nil) or s == ARGV[1]) and cmp(get(KEYS[4]), ARGV[2]) < 0 then
  put_record(KEYS, ARGV)
  return 1
end
return 0
