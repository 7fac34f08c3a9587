-- A node's heartbeat key (node:<node>), holding a token of the process that is the node: two
-- processes started with one id would read the node's inbox as one consumer, each given part of
-- it, and both take the node's sessions. ARGV: the step, the node, the process's token, then
--   'beat' (the TTL in ms): the key is set, alive for the TTL, while it is free or the
--   process's, and the node is one of the members; returns {1 if the key is the process's now,
--   1 if the node was not a member}.
--   'leave' (the control channel): the key goes if it is the process's (or gone already), and
--   the other nodes are told (B); returns {1 if so, 0}.
-- Another process's key is left as it is: {0, 0}.
local P = 'mqtt:'
local step, node, token = ARGV[1], ARGV[2], ARGV[3]
local key = P .. 'node:' .. node
local holder = redis.call('GET', key)
if holder and holder ~= token then
  return {0, 0}
end
if step == 'leave' then
  redis.call('DEL', key)
  redis.call('PUBLISH', ARGV[4], 'B\0' .. node)
  return {1, 0}
end
redis.call('SET', key, token, 'PX', ARGV[4])
return {1, redis.call('SADD', P .. 'nodes', node)}
