"""The one script call that writes a step's regular changes to Redis, and its named arguments.

Every integer list is packed into one binary argument (little-endian int32): redis-py's cost per
argument, not Redis's, dominated at 256+ requests. One script call is atomic on its own, so a
step with nothing else to write needs no MULTI/EXEC around it. The arguments travel in ARGV in
the order of :class:`StepArgs`' fields, and the script reads them by those same names (its
first lines are generated from the class): nothing counts positions by hand.

KEYS: the token log, free blocks, cached blocks, prefix index, load (on a Redis Cluster, then
the keys the appends name, declared only for the cluster's routing). List and string appends
name their keys as data: every key shares the ``{deployment:model}`` hash tag, so they are in
the slot KEYS route the call to. After the named arguments come the load figures, field and
value pairs (``pagewire.worker_load``).
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

from pagewire.block_hash import DIGEST_BYTES


def pack(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def unpack(raw: bytes) -> list[int]:
    out = array("i")
    out.frombytes(raw)
    return out.tolist()


class ListAppends(NamedTuple):
    """Integers pushed onto lists (block tables): key i gets the next counts[i] values."""

    list_names: bytes = b""  # the keys, concatenated
    list_name_lens: bytes = b""
    list_counts: bytes = b""
    list_values: bytes = b""


class StringAppends(NamedTuple):
    """Bytes appended to strings (requests' token strings): key i gets chunk i."""

    string_names: bytes = b""  # the keys, concatenated
    string_name_lens: bytes = b""
    chunk_sizes: bytes = b""
    chunks: bytes = b""  # concatenated


class BlockMoves(NamedTuple):
    """Final places of the blocks that moved, and the prefix index's changes."""

    free_add: bytes = b""
    free_remove: bytes = b""
    cached_score: float | bytes = b"0"  # the score (time) of the cached_add blocks
    cached_add: bytes = b""
    cached_remove: bytes = b""
    hash_width: int = DIGEST_BYTES
    hashes_gone: bytes = b""  # concatenated, hash_width each
    hashes_set: bytes = b""
    hashes_set_blocks: bytes = b""


NO_LISTS, NO_STRINGS, NO_BLOCKS = ListAppends(), StringAppends(), BlockMoves()


class StepArgs(NamedTuple):
    """ARGV of STEP_WRITE, in order, before the load figures' pairs."""

    token_log: bytes
    lists: ListAppends
    strings: StringAppends
    blocks: BlockMoves

    def argv(self) -> tuple[bytes | float | int, ...]:
        return (self.token_log, *self.lists, *self.strings, *self.blocks)


ARG_NAMES = ("token_log", *ListAppends._fields, *StringAppends._fields, *BlockMoves._fields)

STEP_WRITE = f"""
local a = {{}}
for i, name in ipairs({{{", ".join(repr(n) for n in ARG_NAMES)}}}) do a[name] = ARGV[i] end
local function ints(packed)
  local out, pos = {{}}, 1
  for i = 1, #packed / 4 do
    out[i], pos = struct.unpack('<i4', packed, pos)
  end
  return out
end
local function call(command, key, items, first, last)  -- in chunks: Lua's unpack has a limit
  for i = first, last, 4096 do
    redis.call(command, key, unpack(items, i, math.min(i + 4095, last)))
  end
end
local names, at, pos = a.list_names, 1, 0
local counted, all = ints(a.list_counts), ints(a.list_values)
for i, len in ipairs(ints(a.list_name_lens)) do
  call('RPUSH', string.sub(names, at, at + len - 1), all, pos + 1, pos + counted[i])
  at, pos = at + len, pos + counted[i]
end
if #a.token_log > 0 then redis.call('APPEND', KEYS[1], a.token_log) end
local sizes, data = ints(a.chunk_sizes), a.chunks
names, at, pos = a.string_names, 1, 1
for i, len in ipairs(ints(a.string_name_lens)) do
  redis.call('APPEND', string.sub(names, at, at + len - 1), string.sub(data, pos, pos + sizes[i] - 1))
  at, pos = at + len, pos + sizes[i]
end
local free, taken = ints(a.free_add), ints(a.free_remove)
call('SADD', KEYS[2], free, 1, #free)
call('SREM', KEYS[2], taken, 1, #taken)
local cached, uncached = ints(a.cached_add), ints(a.cached_remove)
local scored = {{}}
for i, b in ipairs(cached) do scored[2 * i - 1], scored[2 * i] = a.cached_score, b end
call('ZADD', KEYS[3], scored, 1, #scored)
call('ZREM', KEYS[3], uncached, 1, #uncached)
local width = tonumber(a.hash_width)
local gone = {{}}
for i = 1, #a.hashes_gone / width do gone[i] = string.sub(a.hashes_gone, (i - 1) * width + 1, i * width) end
call('HDEL', KEYS[4], gone, 1, #gone)
local hashed, entries = ints(a.hashes_set_blocks), {{}}
for i, b in ipairs(hashed) do
  entries[2 * i - 1], entries[2 * i] = string.sub(a.hashes_set, (i - 1) * width + 1, i * width), b
end
call('HSET', KEYS[4], entries, 1, #entries)
if #ARGV > {len(ARG_NAMES)} then redis.call('HSET', KEYS[5], unpack(ARGV, {len(ARG_NAMES) + 1})) end
return 1
"""
