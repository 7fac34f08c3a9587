-- One batch of a node's changes, applied at once: a script runs alone, and with appendonly its
-- effects are written together. ARGV: the node, a marker naming the batch (kept in
-- applied:<node>, so that a batch whose answer was lost is not applied twice), the inboxes'
-- MAXLEN, the control channel, then the changes, each an opcode and its arguments.
--
-- A change to a session carries the epoch its node claimed the session at (claim.lua) and is
-- made only if that is still the session's epoch: once another node has claimed the session,
-- the old owner's late writes are refused here (fencing). A message the old owner queued for it
-- then goes to the new owner's inbox instead. Returns 'client\0epoch' for each epoch refused.
-- A change of a retained topic that a lease guards (lease.lua: a bridge's state) is refused
-- likewise while another node holds the lease: its node hears what Redis keeps ('K' event).
local P = 'mqtt:'
local node, marker, maxlen, control = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local verdict, refused = {}, {}
-- Each inbox entry is stamped with the epochs counter (field 'e'): a session begun anew after
-- it was made has a higher 'since_stamp' (claim.lua), and the entry's messages for it are dropped.
local stamp = redis.call('GET', P .. 'epochs') or '0'

-- Sent again after an outage, a batch that was applied is not applied twice; the epochs it
-- found refused are answered again (refused:<node> keeps those of the last batch applied).
local last = redis.call('GET', P .. 'applied:' .. node)
if last then
  local last_incarnation, last_number = string.match(last, '^(.*):(%d+)$')
  local incarnation, number = string.match(marker, '^(.*):(%d+)$')
  if last_incarnation == incarnation and tonumber(last_number) >= tonumber(number) then
    if tonumber(last_number) == tonumber(number) then
      return redis.call('LRANGE', P .. 'refused:' .. node, 0, -1)
    end
    return refused
  end
end

-- A message for a session this batch cannot write to, queued at epoch ``n`` (``since``
-- 'since') or passed on from an inbox entry stamped ``n`` ('since_stamp'; 0: none): to the inbox
-- of the session's owner, unless the session was begun anew (a clean start) since, or is gone.
local function pass_on(c, n, since, data)
  local owner = redis.call('HMGET', P .. 'owner:' .. c, 'node', since)
  if owner[1] and not (owner[2] and n > 0 and tonumber(owner[2]) > n) then
    redis.call('XADD', P .. 'inbox:' .. owner[1], 'MAXLEN', '~', maxlen, '*', 'd', data, 'e', stamp)
  end
end

-- Whether this node may change a retained topic the lease guards ('': none): while the lease is
-- free or this node's. A node cut off from Redis as its lease ran out writes its bridge's "0"
-- once back, when the next holder may have written its own state.
local function unleased(lease)
  if lease == '' then return true end
  local holder = redis.call('GET', P .. 'lease:' .. lease)
  return not holder or holder == node
end

-- A change of a retained topic refused: the node's replica, which has the change, is told what
-- Redis keeps ('': none). The event is for that node alone.
local function kept(topic)
  local held = redis.call('HGET', P .. 'retained', topic) or ''
  redis.call('PUBLISH', control, 'K\0' .. node .. '\0' .. topic .. '\0' .. held)
end

local function mine(c, epoch)
  local key = c .. '\0' .. epoch
  local ok = verdict[key]
  if ok == nil then
    ok = redis.call('HGET', P .. 'owner:' .. c, 'epoch') == epoch
    verdict[key] = ok
    if not ok then refused[#refused + 1] = key end
  end
  return ok
end

local i = 5
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'Q' then -- a message for a session: client epoch seq item packet_id released redirect_head
    local c, seq = ARGV[i + 1], ARGV[i + 3]
    if mine(c, ARGV[i + 2]) then
      redis.call('HSET', P .. 'deliv:' .. c, seq, ARGV[i + 4])
      if ARGV[i + 5] == '' then
        redis.call('ZADD', P .. 'queue:' .. c, seq, seq)
      else
        redis.call('HSET', P .. 'inflight:' .. c, seq, ARGV[i + 5] .. ':' .. ARGV[i + 6])
      end
    else
      pass_on(c, tonumber(ARGV[i + 2]), 'since', ARGV[i + 7] .. ARGV[i + 4])
    end
    i = i + 8
  elseif op == 'T' then -- a message passed on by a node that does not hold the session: client stamp item head
    pass_on(ARGV[i + 1], tonumber(ARGV[i + 2]), 'since_stamp', ARGV[i + 4] .. ARGV[i + 3])
    i = i + 5
  elseif op == 'M' then -- in flight now: client epoch seq packet_id released
    local c, seq = ARGV[i + 1], ARGV[i + 3]
    if mine(c, ARGV[i + 2]) then
      redis.call('ZREM', P .. 'queue:' .. c, seq)
      redis.call('HSET', P .. 'inflight:' .. c, seq, ARGV[i + 4] .. ':' .. ARGV[i + 5])
    end
    i = i + 6
  elseif op == 'q' then -- acknowledged or dropped: client epoch seq
    local c, seq = ARGV[i + 1], ARGV[i + 3]
    if mine(c, ARGV[i + 2]) then
      redis.call('HDEL', P .. 'deliv:' .. c, seq)
      redis.call('HDEL', P .. 'inflight:' .. c, seq)
      redis.call('ZREM', P .. 'queue:' .. c, seq)
    end
    i = i + 4
  elseif op == 'S' then -- the session: client epoch expiry disconnected_at next_seq
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then
      redis.call('HSET', P .. 'session:' .. c, 'expiry', ARGV[i + 3], 'disconnected_at', ARGV[i + 4],
                 'next_seq', ARGV[i + 5])
    end
    i = i + 6
  elseif op == 'D' then -- the session ends: client epoch
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then
      redis.call('DEL', P .. 'session:' .. c, P .. 'subs:' .. c, P .. 'deliv:' .. c, P .. 'inflight:' .. c,
                 P .. 'queue:' .. c, P .. 'pubrel:' .. c)
    end
    i = i + 3
  elseif op == 'E' then -- the node gives the client up: client epoch
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then
      redis.call('DEL', P .. 'owner:' .. c)
      redis.call('SREM', P .. 'clients:' .. node, c)
    end
    i = i + 3
  elseif op == 'x' then -- another node claimed the client: client
    redis.call('SREM', P .. 'clients:' .. node, ARGV[i + 1])
    redis.call('HDEL', P .. 'wills-left:' .. node, ARGV[i + 1], ARGV[i + 1] .. '\0')
    i = i + 2
  elseif op == 'L' then -- a will this node took (wills-due, claim.lua and wills.lua) is published, kept or dropped: id
    redis.call('HDEL', P .. 'wills-due:' .. node, ARGV[i + 1])
    i = i + 2
  elseif op == 'U' then -- a subscription: client epoch filter options
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then redis.call('HSET', P .. 'subs:' .. c, ARGV[i + 3], ARGV[i + 4]) end
    i = i + 5
  elseif op == 'u' then -- client epoch filter
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then redis.call('HDEL', P .. 'subs:' .. c, ARGV[i + 3]) end
    i = i + 4
  elseif op == 'P' or op == 'p' then -- an inbound QoS 2 packet id awaiting PUBREL: client epoch id
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then
      redis.call(op == 'P' and 'SADD' or 'SREM', P .. 'pubrel:' .. c, ARGV[i + 3])
    end
    i = i + 4
  elseif op == 'W' then -- the will: client epoch will
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then redis.call('HSET', P .. 'session:' .. c, 'will', ARGV[i + 3]) end
    i = i + 4
  elseif op == 'w' then -- client epoch
    local c = ARGV[i + 1]
    if mine(c, ARGV[i + 2]) then redis.call('HDEL', P .. 'session:' .. c, 'will') end
    i = i + 3
  elseif op == 'R' then -- a retained message: topic message lease
    if unleased(ARGV[i + 3]) then
      redis.call('HSET', P .. 'retained', ARGV[i + 1], ARGV[i + 2])
      redis.call('PUBLISH', control, 'R\0' .. node .. '\0' .. ARGV[i + 1] .. '\0' .. ARGV[i + 2])
    else
      kept(ARGV[i + 1])
    end
    i = i + 4
  elseif op == 'r' then -- topic lease
    if unleased(ARGV[i + 2]) then
      redis.call('HDEL', P .. 'retained', ARGV[i + 1])
      redis.call('PUBLISH', control, 'r\0' .. node .. '\0' .. ARGV[i + 1])
    else
      kept(ARGV[i + 1])
    end
    i = i + 3
  elseif op == 'e' then -- a retained message expired by now (a node's clock): topic now
    -- (only if what Redis holds is that expired one: another node may have set the topic anew;
    -- no event: every node drops an expired message from its replica by itself)
    local held = redis.call('HGET', P .. 'retained', ARGV[i + 1])
    if held and string.byte(held, 1) <= 1 then -- (a head's version, not a PUBLISH alone: codec.py)
      local at = struct.unpack('>d', string.sub(held, 2, 9))
      if at > 0 and at <= tonumber(ARGV[i + 2]) then redis.call('HDEL', P .. 'retained', ARGV[i + 1]) end
    end
    i = i + 3
  elseif op == 'X' then -- messages for a node's inbox (this node's too): node entry
    redis.call('XADD', P .. 'inbox:' .. ARGV[i + 1], 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i + 2], 'e', stamp)
    i = i + 3
  elseif op == 'Y' then -- messages for a node's inbox, some of them guarded: node count, then count times client epoch records
    -- Records of a client's QoS 2 PUBLISH ('' client: none) go only if its session is this
    -- node's: judged as the change recording its packet id, earlier in the batch, is (a verdict
    -- holds for the whole batch). The rest go in one entry, in order.
    local parts, j = {}, i + 3
    for _ = 1, tonumber(ARGV[i + 2]) do
      if ARGV[j] == '' or mine(ARGV[j], ARGV[j + 1]) then parts[#parts + 1] = ARGV[j + 2] end
      j = j + 3
    end
    if #parts > 0 then
      redis.call('XADD', P .. 'inbox:' .. ARGV[i + 1], 'MAXLEN', '~', maxlen, '*', 'd', table.concat(parts), 'e', stamp)
    end
    i = j
  elseif op == 'A' then -- an inbox entry is handled: the inbox's node ('': this node's), entry id
    redis.call('XACK', P .. 'inbox:' .. (ARGV[i + 1] == '' and node or ARGV[i + 1]), 'nodes', ARGV[i + 2])
    i = i + 3
  elseif op == 'F' or op == 'I' or op == 'f' then -- a topic filter this node's sessions hold
    -- ('I': a shared one whose members here are all offline), or no longer; the event carries
    -- the routes' new version (routes.lua)
    if op ~= 'f' then
      redis.call('HSET', P .. 'routes:' .. node, ARGV[i + 1], op == 'F' and '1' or '0')
    else
      redis.call('HDEL', P .. 'routes:' .. node, ARGV[i + 1])
    end
    local version = redis.call('HINCRBY', P .. 'routes-version', node, 1)
    redis.call('PUBLISH', control, op .. '\0' .. node .. '\0' .. ARGV[i + 1] .. '\0' .. version)
    i = i + 2
  else
    return redis.error_reply('unknown change ' .. tostring(op))
  end
end
redis.call('SET', P .. 'applied:' .. node, marker)
redis.call('DEL', P .. 'refused:' .. node)
for first = 1, #refused, 1000 do  -- (unpack takes a few thousand values at most)
  redis.call('RPUSH', P .. 'refused:' .. node, unpack(refused, first, math.min(first + 999, #refused)))
end
return refused
