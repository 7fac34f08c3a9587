-- Wills no live node will publish, taken by the node that will (ARGV: the step, the taking node,
-- the node they were another's of, then for 'left' the client):
--   'left': a will a claim left to a node that died before it heard of the claim (wills-left,
--   claim.lua), under a new id;
--   'due': every will a node took and did not finish (wills-due, claim.lua), a dead one's, or
--   the taking node's own (read only: before a restart, or a claim whose answer was lost).
-- Each goes to wills-due:<taking node>, where it stays until the batch that publishes, keeps or
-- drops it ('L', batch.lua): taken once, whichever nodes ask at the same time, and never lost
-- with a node that dies before that batch. Returns id, 'flag\0client\0will', ... where the
-- flag is '0' if the will's session ended, 'c' if its client is back, or the session's expiry;
-- nothing if that other node is alive. (Claims mark the owner 'adopted' when an adoption made them.)
local P = 'mqtt:'
local step, taker, node = ARGV[1], ARGV[2], ARGV[3]
local due = P .. 'wills-due:' .. taker
if node ~= taker and redis.call('EXISTS', P .. 'node:' .. node) == 1 then
  return {}  -- (alive: taken for dead, it beat again; they are its own)
end
if step == 'left' then
  local c, left = ARGV[4], P .. 'wills-left:' .. node
  local found = redis.call('HMGET', left, c, c .. '\0')
  if not found[1] then
    return {}
  end
  redis.call('HDEL', left, c, c .. '\0')
  local id = redis.call('INCR', P .. 'epochs')
  local value = (found[2] and '0' or 'c') .. '\0' .. c .. '\0' .. found[1]
  redis.call('HSET', due, id, value)
  return {id, value}
end
-- A will whose session another node holds now: its client is back (flagged 'c'), or, taken by
-- another node adopting the dead one at the same time, left for that node to take.
local from = P .. 'wills-due:' .. node
local wills, taken = redis.call('HGETALL', from), {}
for j = 1, #wills, 2 do
  local c, will = string.match(wills[j + 1], '^[^%z]*%z([^%z]*)%z(.*)$')
  local owner = redis.call('HMGET', P .. 'owner:' .. c, 'node', 'adopted')
  local elsewhere = owner[1] and owner[1] ~= node and owner[1] ~= taker
  if not (elsewhere and owner[2] and node ~= taker) then
    local value = elsewhere and ('c\0' .. c .. '\0' .. will) or wills[j + 1]
    taken[#taken + 1] = wills[j]
    taken[#taken + 1] = value
    if node ~= taker then
      redis.call('HSET', due, wills[j], value)
      redis.call('HDEL', from, wills[j])
    end
  end
end
return taken
