-- uses: lib.lua
-- Other writers of this or an older version still in flight (a writer told to write
-- again waits for them).
--
-- KEYS[1]  p:wip:{PIN}
-- ARGV[1]  the pin version
-- ARGV[2]  claim ttl, ms
-- returns: how many; expired claims are dropped and mark the writers above them
return older(KEYS[1], ARGV[1], tonumber(ARGV[2]))
