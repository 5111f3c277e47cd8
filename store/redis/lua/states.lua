-- uses: lib.lua
-- One pin's stored state in one version.
--
-- KEYS[1]  p:v:meta:{PIN}
-- returns: {pin version, content hash} (nil when absent)
return redis.call('HMGET', KEYS[1], 'pin_version', 'content_hash')
