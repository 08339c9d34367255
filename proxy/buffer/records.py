"""How verdicts and samples reach Redis: encoded once, written by one idempotent script.

``encode`` turns a (meta, payloads) pair into an ``Encoded`` record: the JSON already made, the
payloads clipped, the counters it adds, the index it joins. The same bytes go to Redis or, while
Redis is unreachable, to the spool (``to_bytes``/``from_bytes``), so a replay writes exactly what
the first attempt would have.

``RecordWriter.write`` sends a batch in one ``EVALSHA`` of ``_SCRIPT``, which Redis runs
atomically. Per record, it first asks whether the record was written already:

- a record with a sample (payloads): its sample hash exists;
- a verdict alone, when replayed: ``SET {ns}:replayed:{id} NX`` (the marker expires after
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
``TRIM_SCAN_MAX`` looked at per write). The script needs one Redis (not a cluster): it derives
its keys from the schema's names, which it is given.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from ..settings import BufferSettings
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
    "reason",
    "reference",
    "candidate_side",
    "outputs",
    "stored",
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
local stream, stats, labels = ARGV[1], ARGV[2], ARGV[3]
local sample_prefix, marker_prefix = ARGV[4], ARGV[5]
local maxlen, ttl, index_max = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local replay, marker_ttl, scan = ARGV[9] == '1', ARGV[10], tonumber(ARGV[11])
local counts, touched, written = {}, {}, 0
local i = 13
for _ = 1, tonumber(ARGV[12]) do
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
  local key = sample_prefix .. id
  local new
  if meta ~= '' then
    new = redis.call('EXISTS', key) == 0
  elseif replay then
    new = redis.call('SET', marker_prefix .. id, '1', 'NX', 'EX', marker_ttl) ~= false
  else
    new = true
  end
  if new then
    written = written + 1
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
        redis.call('DEL', sample_prefix .. sid)
        excess = excess - 1
      end
    end
  end
end
return written
"""


class RecordWriter:
    """Writes batches of records through the script (loaded once per client, by SHA)."""

    def __init__(self, client: aioredis.Redis, settings: BufferSettings, keys: KeySchema) -> None:
        self._script = client.register_script(_SCRIPT)
        self._fixed: list[str | int] = [
            keys.verdicts,
            keys.stats,
            keys.labels,
            keys.sample(""),
            keys.replayed(""),
            settings.stream_maxlen,
            settings.sample_ttl_s,
            settings.flagged_index_max,
        ]

    def args(
        self, records: Sequence[Encoded], *, replay: bool, extra: Counter[str]
    ) -> list[bytes | str | int | float]:
        args: list[bytes | str | int | float] = [
            *self._fixed,
            "1" if replay else "0",
            REPLAY_MARKER_TTL_S,
            TRIM_SCAN_MAX,
            len(extra),
        ]
        for stat, n in extra.items():
            args += [stat, n]
        for r in records:
            args += [r.id, repr(r.ts), r.index, r.summary, r.meta or b"", len(r.fields)]
            for name, value in r.fields:
                args += [name, value]
            args.append(len(r.stats))
            args.extend(r.stats)
        return args

    def call(self, args: list[bytes | str | int | float]) -> Any:
        """The script's call (an awaitable), for the caller to bound."""
        return self._script(keys=[], args=args)
