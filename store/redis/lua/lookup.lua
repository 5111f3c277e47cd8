-- uses: lib.lua
-- What a batch's look-up needs of one pin, in one call (streams/processor.py, step 2).
--
-- KEYS[1]  p:tomb:{PIN}
-- KEYS[2]  p:wip:{PIN}
-- KEYS[3..] p:v:meta:{PIN} of each version
-- returns: {tombstone, writers holding a claim, then pin version and content hash of
--          each version} (nil where absent)
local out = {get(KEYS[1]) or false, claims(KEYS[2])}
for i = 3, #KEYS do
  local m = redis.call('HMGET', KEYS[i], 'pin_version', 'content_hash')
  out[#out + 1] = m[1]
  out[#out + 1] = m[2]
end
return out
