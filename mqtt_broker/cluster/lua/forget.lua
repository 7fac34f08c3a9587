-- The end of a dead node, in two steps (ARGV: the step, the node, the control channel, the
-- markers' TTL), each made only while the node is still dead (its heartbeat key gone): a node
-- taken for dead that is back (a pause over, a restart with its id) has announced its routes and
-- writes to its inbox anew, which neither step may delete. Returns 1 if made, 0 if the node is alive.
--   'forget': its routes, clients and left wills go, and the other nodes are told (G);
--   'drop': its inbox (read to the end), its routes' version and its membership go; its last
--   batch's marker stays for the TTL (a node back from a partition may send that batch again).
local P = 'mqtt:'
local step, dead = ARGV[1], ARGV[2]
if redis.call('EXISTS', P .. 'node:' .. dead) == 1 then
  return 0
end
if step == 'forget' then
  redis.call('DEL', P .. 'routes:' .. dead, P .. 'clients:' .. dead, P .. 'wills-left:' .. dead)
  local version = redis.call('HINCRBY', P .. 'routes-version', dead, 1)
  redis.call('PUBLISH', ARGV[3], 'G\0' .. dead .. '\0' .. version)
else
  redis.call('DEL', P .. 'inbox:' .. dead)
  redis.call('HDEL', P .. 'routes-version', dead)
  redis.call('EXPIRE', P .. 'applied:' .. dead, ARGV[4])
  redis.call('EXPIRE', P .. 'refused:' .. dead, ARGV[4])
  redis.call('SREM', P .. 'nodes', dead)
end
return 1
