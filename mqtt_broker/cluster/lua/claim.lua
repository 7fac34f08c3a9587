-- A node takes a client's session: when the client connects to it, or when the node that held
-- the session is dead (adoption). ARGV: client, node, clean start ('1'/'0'), the epoch the node
-- already holds it at ('0': none), how many queued messages to read (0: all), the node that
-- must hold it now for the claim to proceed ('': any; adoption names the dead node), and how
-- many bytes of queued messages to read at most (0: no bound; the first whatever its size),
-- and the control channel.
--
-- A claim takes a new epoch from one counter (so epochs only grow, whatever happens to a
-- session), which fences off every later write of the previous owner (batch.lua), and tells
-- the previous owner on the control channel. The session's will leaves Redis here, and is
-- returned: a live previous owner publishes it itself, but for a delayed will of a session that
-- goes on (the claimant keeps that one, should its own connection be gone); a dead one's is the
-- claimant's, kept in Redis until it is published (below).
--
-- Returns {epoch, previous node or false, 1 if it is alive, will or false, 1 if the caller's
-- copy is current, since_stamp (below), session fields, subscriptions, {seq, 'packet_id:released', item}...,
-- {seq, item}... queued, queued count, inbound QoS 2 packet ids, the last queued seq}; false if the session is not
-- held by the required node, or if that node (another one) is alive: taken for dead, it beat again.
local P = 'mqtt:'
local c, node, clean, known, window, required = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], tonumber(ARGV[5]), ARGV[6]
local owner_key = P .. 'owner:' .. c
local old = redis.call('HMGET', owner_key, 'node', 'epoch', 'since_stamp')
local old_node, old_epoch, since_stamp = old[1], old[2], old[3] or 0
if required ~= '' and (old_node ~= required or (required ~= node and redis.call('EXISTS', P .. 'node:' .. required) == 1)) then
  return false
end
local data = {P .. 'session:' .. c, P .. 'subs:' .. c, P .. 'deliv:' .. c, P .. 'inflight:' .. c,
              P .. 'queue:' .. c, P .. 'pubrel:' .. c}
-- When the session was begun anew: 'since', the epoch it was held at then (messages queued for
-- its earlier life were queued at a lower one), and 'since_stamp', a value of the epochs counter
-- above every stamp of an inbox entry made before (batch.lua). What is older is dropped, by
-- batch.lua or by the node that holds the session.
if old_node == node and old_epoch == known then -- held already, by this very process
  if clean then
    redis.call('DEL', unpack(data))
    since_stamp = redis.call('INCR', P .. 'epochs')  -- (the epoch stays: this node's writes go on)
    redis.call('HSET', owner_key, 'since', known, 'since_stamp', since_stamp)
  end
  return {known, old_node, 1, false, 1, since_stamp}
end
local epoch = redis.call('INCR', P .. 'epochs')
if clean then
  since_stamp = epoch
  redis.call('HSET', owner_key, 'node', node, 'epoch', epoch, 'since', epoch, 'since_stamp', epoch)
else
  redis.call('HSET', owner_key, 'node', node, 'epoch', epoch)
end
-- A will another node's claim left this one, which it never heard of (it takes the session
-- back first): its own connection's, which it publishes itself as it takes the session back.
redis.call('HDEL', P .. 'wills-left:' .. node, c, c .. '\0')
-- Whether an adoption took it, rather than its client connecting (wills.lua)
if required ~= '' then
  redis.call('HSET', owner_key, 'adopted', '1')
else
  redis.call('HDEL', owner_key, 'adopted')
end
local alive = 0
if old_node and old_node ~= node and redis.call('EXISTS', P .. 'node:' .. old_node) == 1 then alive = 1 end
-- The previous owner keeps the client in its set until it hears of the claim (a node just
-- killed still looks alive for a moment): should it be dead, the survivor that empties its
-- inbox delivers what is left there for the client to the client's session, wherever it is.
redis.call('SADD', P .. 'clients:' .. node, c)
if old_node and old_node ~= node then
  redis.call('PUBLISH', ARGV[8], 'C\0' .. node .. '\0' .. c .. '\0' .. epoch .. '\0' .. (clean and '1' or '0')
             .. '\0' .. alive)
end
local will = redis.call('HGET', data[1], 'will')
redis.call('HDEL', data[1], 'will')
-- A previous owner that looks alive publishes the will itself when it hears of the claim, and
-- says so ('x', batch.lua); one just killed never will: the survivor that adopts it does. With
-- the will, whether the claim ends the session (a clean start, or none kept past the previous
-- connection: field 'client\0'): the will is due at once then, delayed or not.
if will and alive == 1 then
  local left = P .. 'wills-left:' .. old_node
  redis.call('HSET', left, c, will)
  local expiry = redis.call('HGET', data[1], 'expiry')
  if clean or not expiry or expiry == '0' then
    redis.call('HSET', left, c .. '\0', '1')
  else
    redis.call('HDEL', left, c .. '\0')
  end
elseif will then
  -- A dead previous owner (or this node before a restart) never will: the claimant does. The will
  -- stays in Redis (wills-due:<claimant>, under this epoch) until the claimant's batch that
  -- publishes, keeps or drops it ('L', batch.lua): should the claimant die first, the node that
  -- adopts it takes the will from there (wills.lua). With it, '0' if the session ends, or its expiry.
  local expiry = redis.call('HGET', data[1], 'expiry')
  local ends = clean or not expiry or expiry == '0'
  redis.call('HSET', P .. 'wills-due:' .. node, epoch, (ends and '0' or expiry) .. '\0' .. c .. '\0' .. will)
end
if clean and (alive == 1 or not old_node) then -- (a live previous owner ends it itself)
  redis.call('DEL', unpack(data))
  return {epoch, old_node or false, alive, will, 0, since_stamp}
end
-- A clean start ends the session here, returned all the same: what its shared subscriptions
-- did not finish goes to another member of each.
if clean then window = 0 end
local inflight = {}
local seqs = redis.call('HGETALL', data[4])
for j = 1, #seqs, 2 do
  inflight[#inflight + 1] = {seqs[j], seqs[j + 1], redis.call('HGET', data[3], seqs[j])}
end
local queued = {}
local most = (not clean) and tonumber(ARGV[7] or '0') or 0
local size = 0
local first = redis.call('ZRANGE', data[5], 0, window > 0 and window - 1 or -1)
for j = 1, #first do
  local item = redis.call('HGET', data[3], first[j])
  if item then
    size = size + #item
    if most > 0 and size > most and #queued > 0 then
      break
    end
  end
  queued[#queued + 1] = {first[j], item}
end
local last = redis.call('ZRANGE', data[5], -1, -1)
local reply = {epoch, old_node or false, alive, will, 0, since_stamp, redis.call('HGETALL', data[1]), redis.call('HGETALL', data[2]),
               inflight, queued, redis.call('ZCARD', data[5]), redis.call('SMEMBERS', data[6]), last[1] or 0}
if clean then redis.call('DEL', unpack(data)) end
return reply
