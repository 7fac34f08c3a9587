-- The queued messages of a session after a seq, in order, at most a number. ARGV: client,
-- after, limit. Returns {seq, item}...
local P = 'mqtt:'
local c = ARGV[1]
local seqs = redis.call('ZRANGEBYSCORE', P .. 'queue:' .. c, '(' .. ARGV[2], '+inf', 'LIMIT', 0, ARGV[3])
local out = {}
for j = 1, #seqs do
  out[#out + 1] = {seqs[j], redis.call('HGET', P .. 'deliv:' .. c, seqs[j])}
end
return out
