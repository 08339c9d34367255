"""How verdicts and samples reach Redis: encoded once, written by one idempotent script.

``encode`` turns a (meta, payloads) pair into an ``Encoded`` record: the JSON already made, the
payloads clipped, the counters it adds, the index it joins. The same bytes go to Redis or, while
Redis is unreachable, to the spool (``to_bytes``/``from_bytes``), so a replay writes exactly what
the first attempt would have.

``RecordWriter.write`` sends a batch in one ``EVALSHA`` of ``_SCRIPT``, which Redis runs
atomically. Per record, it first asks whether the record was written already:

- a record with a sample (payloads): its sample hash exists;
- a verdict alone, when replayed: ``SET {<ns>}:replayed:<id> NX`` (the marker expires after
  ``REPLAY_MARKER_TTL_S``).

Only a new record adds its stream entry, sample, index entry and counters, so replaying a
segment again (after a crash between writing it and deleting it, or after Redis failed half way
through) writes nothing twice. What remains: a verdict *without* a sample whose first, direct
write Redis applied but whose reply was lost (a timeout or a dropped connection at that very
moment) is spooled and replayed without a marker to find, and so counted twice; markers on
every direct write would cost a key per verdict for as long as an outage may last. Samples
(every flagged verdict has one) are never duplicated.

After the records, each index written to is trimmed to ``buffer.flagged_index_max``: the oldest
unlabelled ids leave it and their samples are deleted with them; labelled ids stay (at most
``TRIM_SCAN_MAX`` looked at per write).

**On a Redis Cluster** a sample's hash lives in its own slot (``keys``), away from the stream,
indexes, labels, counters and replay marks (which share one). A batch is then written in three
steps: each new sample's hash (``_SAMPLE_SCRIPT``: only if it does not exist, so a label given
since is never overwritten); then the same script on the index's slot, which for a record with
a sample asks the index instead (``ZADD NX``) and writes no hash; then the deletion of the
hashes of the samples trimmed from an index. What that changes:

- A failure after the first step leaves samples that are stored but not yet listed, counted or
  in the stream. The batch is spooled as any failed one, and its replay completes them exactly
  once: the first step finds their hashes, the second does not find them in the index. Without
  a spool (or with it full) they stay unlisted until their TTL, reachable by id.
- A failure in the third step leaves trimmed samples' hashes behind (unlisted) until their TTL.
- Verdicts alone and replay marks are in the index's slot: unchanged.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from ..settings import BufferSettings
from .connect import RedisClient
from .keys import (
    FIELD_META,
    FIELD_SUMMARY,
    PAYLOAD_FIELDS,
    REPLAY_MARKER_TTL_S,
    TRIM_SCAN_MAX,
    KeySchema,
    flagged_stat,
    outcome_stat,
)

_LEN = struct.Struct(">I")

# What goes into the stream entry: enough for reports and lists, no payloads.
SUMMARY_KEYS = (
    "id",
    "ts",
    "request_id",
    "candidate",
    "noise_floor",
    "model",
    "protocol",
    "snippet",
    "outcome",
    "flagged",
    "severity",
    "severity_norm",
    "noise_p",
    "reason",
    "reference",
    "candidate_side",
    "outputs",
    "stored",
    "build",
)


@dataclass(frozen=True, slots=True)
class Encoded:
    id: str
    ts: float
    candidate: str
    index: str
    """The index key it joins (flagged or kept), or "" for a verdict without a sample."""
    summary: bytes
    meta: bytes | None
    """None: a verdict alone, no sample hash."""
    fields: tuple[tuple[str, bytes], ...]
    stats: tuple[str, ...]

    def to_bytes(self) -> bytes:
        parts = [(FIELD_SUMMARY, self.summary)]
        if self.meta is not None:
            parts.append((FIELD_META, self.meta))
        parts.extend(self.fields)
        head = orjson.dumps(
            {
                "id": self.id,
                "ts": self.ts,
                "candidate": self.candidate,
                "index": self.index,
                "stats": self.stats,
                "parts": [[name, len(value)] for name, value in parts],
            }
        )
        return b"".join([_LEN.pack(len(head)), head, *(value for _, value in parts)])

    @classmethod
    def from_bytes(cls, data: bytes) -> Encoded:
        (n,) = _LEN.unpack_from(data)
        head = orjson.loads(data[_LEN.size : _LEN.size + n])
        pos, parts = _LEN.size + n, {}
        for name, length in head["parts"]:
            parts[name] = data[pos : pos + length]
            pos += length
        summary = parts.pop(FIELD_SUMMARY)
        meta = parts.pop(FIELD_META, None)
        return cls(
            head["id"],
            head["ts"],
            head["candidate"],
            head["index"],
            summary,
            meta,
            tuple(parts.items()),
            tuple(head["stats"]),
        )


def encode(
    meta: Mapping[str, Any],
    payloads: Mapping[str, bytes] | None,
    settings: BufferSettings,
    keys: KeySchema,
) -> Encoded:
    """A record as it will be written; ``payloads`` None: the verdict alone (no sample)."""
    summary = dumps({k: meta[k] for k in SUMMARY_KEYS if k in meta})
    stats = [outcome_stat(meta["candidate"], meta["outcome"])]
    for out in meta.get("outputs", ()):
        if out.get("flagged"):
            stats.append(flagged_stat(meta["candidate"], meta["model"], out["output"]))
    index = ""
    fields: tuple[tuple[str, bytes], ...] = ()
    if payloads is not None:
        index = keys.flagged if meta.get("flagged") else keys.kept
        limit = settings.max_payload_bytes
        kept = {k: v for k, v in payloads.items() if k in PAYLOAD_FIELDS}
        # Bodies beyond the limit are kept as their first bytes, and the sample says so (with
        # the size they had); headers are whole (the head limit bounds them), or they would not
        # parse.
        cut = {k: len(v) for k, v in kept.items() if len(v) > limit and not k.endswith("_headers")}
        fields = tuple((k, v[:limit] if k in cut else v) for k, v in kept.items())
        if cut:
            meta = {**meta, "truncated": cut}
    return Encoded(
        str(meta["id"]),
        float(meta["ts"]),
        str(meta["candidate"]),
        index,
        summary,
        dumps(meta) if payloads is not None else None,
        fields,
        tuple(stats),
    )


def dumps(record: Mapping[str, Any]) -> bytes:
    """JSON by orjson (numpy scalars as numbers); anything it refuses, by the json module."""
    try:
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return json.dumps(record).encode()


_SCRIPT = """
local stream, stats, labels = KEYS[1], KEYS[2], KEYS[3]
local sample_prefix, sample_suffix, marker_prefix = ARGV[1], ARGV[2], ARGV[3]
local maxlen, ttl, index_max = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local replay, marker_ttl, scan = ARGV[7] == '1', ARGV[8], tonumber(ARGV[9])
local split = ARGV[10] == '1'
local counts, touched, trimmed = {}, {}, {}
local i = 12
for _ = 1, tonumber(ARGV[11]) do
  counts[ARGV[i]] = (counts[ARGV[i]] or 0) + tonumber(ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  local id, ts, index, summary, meta = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local nfields = tonumber(ARGV[i + 5])
  local first_field = i + 6
  i = first_field + 2 * nfields
  local nstats = tonumber(ARGV[i])
  local first_stat = i + 1
  i = first_stat + nstats
  local key = sample_prefix .. id .. sample_suffix
  local new
  if index ~= '' and split then
    new = redis.call('ZADD', index, 'NX', ts, id) == 1
  elseif index ~= '' then
    new = redis.call('EXISTS', key) == 0
  elseif replay then
    new = redis.call('SET', marker_prefix .. id, '1', 'NX', 'EX', marker_ttl) ~= false
  else
    new = true
  end
  if new then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'sample', id, 'json', summary)
    if meta ~= '' then
      local h = {'meta', meta, 'summary', summary}
      for k = first_field, first_field + 2 * nfields - 1 do h[#h + 1] = ARGV[k] end
      redis.call('HSET', key, unpack(h))
      redis.call('EXPIRE', key, ttl)
    end
    if index ~= '' then
      redis.call('ZADD', index, ts, id)
      touched[index] = true
    end
    for k = first_stat, first_stat + nstats - 1 do
      counts[ARGV[k]] = (counts[ARGV[k]] or 0) + 1
    end
  end
end
for stat, n in pairs(counts) do redis.call('HINCRBY', stats, stat, n) end
for index, _ in pairs(touched) do
  local excess = redis.call('ZCARD', index) - index_max
  if excess > 0 then
    for _, sid in ipairs(redis.call('ZRANGE', index, 0, excess + scan - 1)) do
      if excess <= 0 then break end
      if redis.call('HEXISTS', labels, sid) == 0 then
        redis.call('ZREM', index, sid)
        if split then
          trimmed[#trimmed + 1] = sid
        else
          redis.call('DEL', sample_prefix .. sid .. sample_suffix)
        end
        excess = excess - 1
      end
    end
  end
end
return trimmed
"""

# A cluster's first step: a sample's hash, alone in its slot, written unless it exists already
# (a replay, or a label given since, must not be overwritten). ARGV: ttl, then field, value...
_SAMPLE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class RecordWriter:
    """Writes batches of records through the script (loaded once per client, by SHA).

    One server: one atomic script call per batch. A cluster: the samples' hashes first (one
    small script each, pipelined; redis-py sends each node its own), then the script on the
    index's slot, then the deletion of the samples its trimming dropped."""

    def __init__(self, client: RedisClient, settings: BufferSettings, keys: KeySchema) -> None:
        self._r = client
        self._split = isinstance(client, RedisCluster)
        self._keys = keys
        self._ttl = settings.sample_ttl_s
        # Typed for Redis alone in redis-py; RedisCluster has it too (its SCRIPT LOAD goes to
        # every primary, its EVALSHA to the slot of the keys).
        self._script = client.register_script(_SCRIPT)  # type: ignore[misc]
        self._index_keys = [keys.verdicts, keys.stats, keys.labels, keys.flagged, keys.kept]
        sample_prefix, sample_suffix = keys.sample_affixes()
        self._fixed: list[str | int] = [
            sample_prefix,
            sample_suffix,
            keys.replayed(""),
            settings.stream_maxlen,
            settings.sample_ttl_s,
            settings.flagged_index_max,
        ]

    async def write(self, records: Sequence[Encoded], *, replay: int, extra: Counter[str]) -> None:
        """Write a batch; redis-py's errors propagate, for the caller to bound and translate.
        ``replay``: 0 for a direct write, else the seconds a verdict's replay mark lives (a
        spool replay: ``REPLAY_MARKER_TTL_S``; a stream worker's write, which can only be
        repeated while its copy is pending: ``WORKER_MARKER_TTL_S``)."""
        if self._split:
            await self.write_samples([r for r in records if r.meta is not None])
        trimmed = await self._script(keys=self._index_keys, args=self.args(records, replay, extra))
        if trimmed:
            pipe = self._r.pipeline(transaction=False)
            for sid in trimmed:
                pipe.delete(self._keys.sample(sid.decode()))
            await pipe.execute()

    async def write_samples(self, records: Sequence[Encoded]) -> None:
        """A cluster's first step: each new sample's hash, in its own slot."""
        if not records:
            return
        pipe = self._r.pipeline(transaction=False)
        for r in records:
            assert r.meta is not None
            fields: list[bytes | str | int] = [FIELD_META, r.meta, FIELD_SUMMARY, r.summary]
            for name, value in r.fields:
                fields += [name, value]
            pipe.eval(_SAMPLE_SCRIPT, 1, self._keys.sample(r.id), self._ttl, *fields)
        await pipe.execute()

    def args(
        self, records: Sequence[Encoded], replay: int, extra: Counter[str]
    ) -> list[bytes | str | int | float]:
        args: list[bytes | str | int | float] = [
            *self._fixed,
            "1" if replay else "0",
            replay or REPLAY_MARKER_TTL_S,
            TRIM_SCAN_MAX,
            "1" if self._split else "0",
            len(extra),
        ]
        for stat, n in extra.items():
            args += [stat, n]
        for r in records:
            if self._split:  # the sample's hash is written already: its index entry only
                args += [r.id, repr(r.ts), r.index, r.summary, b"", 0]
            else:
                args += [r.id, repr(r.ts), r.index, r.summary, r.meta or b"", len(r.fields)]
                for name, value in r.fields:
                    args += [name, value]
            args.append(len(r.stats))
            args.extend(r.stats)
        return args
