-- A node's topic filters and the version they are at (its count of route changes, which each
-- change's event on the control channel carries), read at once. ARGV: the node.
return {redis.call('HGET', 'mqtt:routes-version', ARGV[1]) or '0', redis.call('HGETALL', 'mqtt:routes:' .. ARGV[1])}
