-- The queued messages of a session after a seq, in order, at most a number and, given a number
-- of bytes (0: none), no more than that (the first whatever its size). ARGV: client, after,
-- limit, bytes. Returns {seq, item}...
local P = 'mqtt:'
local c = ARGV[1]
local most = tonumber(ARGV[4] or '0')
local seqs = redis.call('ZRANGEBYSCORE', P .. 'queue:' .. c, '(' .. ARGV[2], '+inf', 'LIMIT', 0, ARGV[3])
local out = {}
local size = 0
for j = 1, #seqs do
  local item = redis.call('HGET', P .. 'deliv:' .. c, seqs[j])
  if item then
    size = size + #item
    if most > 0 and size > most and #out > 0 then
      break
    end
  end
  out[#out + 1] = {seqs[j], item}
end
return out
