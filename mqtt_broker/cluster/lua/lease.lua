-- A lease that one node holds at a time, for what only one node of the cluster may run (a
-- bridge). ARGV: the step, the lease's name, the node, the TTL in ms.
--   'take': taken while free, renewed while the node holds it (a holder's renewal past its
--   TTL finds it free, or another node's); returns 1 if the node holds it now, else 0.
--   'give': freed if the node holds it (the others take it at their next heartbeat).
local key = 'mqtt:lease:' .. ARGV[2]
local holder = redis.call('GET', key)
if ARGV[1] == 'give' then
  if holder == ARGV[3] then
    redis.call('DEL', key)
  end
  return 0
end
if holder and holder ~= ARGV[3] then
  return 0
end
redis.call('SET', key, ARGV[3], 'PX', ARGV[4])
return 1
