"""Every Redis key and TTL the proxy uses, in one place.

Schema (``<ns>`` is the namespace, default ``sp:v1``; ``<id>`` and the like are placeholders.
Braces in key names are literal: Redis Cluster hash tags, see below; in field names and values
they mark placeholders):

``{<ns>}:verdicts``          STREAM  one entry per comparison (flagged or not), trimmed to
                                     ``buffer.stream_maxlen``. Fields: ``sample`` (the sample id),
                                     ``json`` (the verdict summary as JSON).
``<ns>:sample:{<id>}``       HASH    a stored sample: ``meta`` (JSON: ids, models, versions,
                                     latencies, every score, reason), ``summary`` (the same
                                     without tensor previews, for fast lists), ``request``,
                                     ``request_headers``, ``reference_body``, ``reference_headers``,
                                     ``candidate_body``, ``candidate_headers``, ``label`` (JSON).
                                     Expires after ``buffer.sample_ttl_s``; a label sets
                                     ``buffer.labelled_ttl_s`` instead (and an export gives a
                                     labelled sample ``sample_ttl_s`` back). Bodies and headers
                                     are stored redacted (``proxy/redact.py``).
``{<ns>}:flagged``           ZSET    flagged sample ids scored by time; trimmed to
                                     ``buffer.flagged_index_max``; ids whose hash expired are
                                     pruned on read.
``{<ns>}:kept``              ZSET    the same for unflagged samples stored for context
                                     (``buffer.store_unflagged_rate``). Every stored sample is in
                                     exactly one of the two indexes, and trimming an index deletes
                                     the trimmed samples with it (never an orphan; on a cluster
                                     the writer deletes them right after, see ``records``);
                                     labelled ones are never trimmed: they stay listed until their
                                     own TTL. The verdict stream holds no samples: its trimming
                                     drops verdict summaries only.
``{<ns>}:labels``            HASH    sample id -> its label (JSON), read in one call for lists;
                                     pruned with the index.
``{<ns>}:stats``             HASH    counters for ``/api/summary``: ``{candidate}|{outcome}``,
                                     ``{candidate}|{model}|{output}|flagged``, and
                                     ``{candidate}|spool_full`` (verdicts lost because Redis was
                                     down and the on-disk spool was full; added once Redis is
                                     back).
``{<ns>}:replayed:<id>``     STRING  marks a verdict without a sample (no payloads) written by a
                                     spool replay, so a replay repeated after a crash cannot add
                                     it twice (a sample's own hash is its mark). Expires after
                                     ``REPLAY_MARKER_TTL_S``.

``<ns>:session:{<sid>}``     STRING  a browser login (JSON: user, role, csrf), expiring after
                                     ``admin.session_ttl_s``.

``<ns>:canary:{<rollout>}``            STRING  the rollout (JSON: status, step, weight, attempt,
                                              when the step began, approvals, why). Every change
                                              is a WATCH/MULTI check-and-set, so replicas and the
                                              CLI never overwrite each other. No TTL.
``<ns>:canary:{<rollout>}:decisions``  LIST    decisions, newest first (JSON: step, weight,
                                              outcome, every gate's value and threshold, who);
                                              trimmed to ``CANARY_DECISIONS_MAX``. No TTL.
``<ns>:canary:{<rollout>}:changes``    CHANNEL every state written (JSON, as the state key
                                              holds it) is published here right after its
                                              write, so every replica applies a rollback within
                                              a moment instead of at its next evaluation.
``<ns>:canary:{<rollout>}:ev:<attempt>:<step>``
                                      HASH    the evidence of one step: counters (compared,
                                              flagged, errors per side, paired discordances) and
                                              latency histograms (``lat_ref:{bucket}``,
                                              ``lat_cand:{bucket}``), summed by every replica.
                                              Expires ``CANARY_EVIDENCE_TTL_S`` after the last
                                              write.

``<ns>:pop:cells``           HASH    population cell id -> the cell's dimensions (JSON: model,
                                     candidate, output, metric, headline, build), so readers
                                     list cells without SCAN. Written once per new cell.
``<ns>:pop:{<cell>}:m:<minute>``
                             HASH    one cell's population statistics for one minute (minutes
                                     since the epoch): counters (``n``, ``flagged``,
                                     ``invalid``, ``pairs``, ``mc_b``, ``mc_c``) and log-bucket
                                     sketch bins (``s:{i}`` severity, ``h:{i}`` headline score;
                                     ``hn:{i}`` negative scores, ``s0``/``h0`` zeros), summed with
                                     HINCRBY by every process, so buckets merge exactly.
                                     Expires ``buffer.stats_retention_min`` after its minute.
``<ns>:pop:{<cell>}:pairs``  LIST    the cell's reservoir of paired severity differences
                                     (candidate minus the noise-floor twin, same request) for the
                                     Wilcoxon test: ``{minute}:{diff}``, newest first, trimmed
                                     to ``POPULATION_PAIRS_MAX``; expires with the retention.
``<ns>:copies``              STREAM  sampled copies for the comparison workers
                                     (``proxy.compare: redis``): one entry per copy (request,
                                     redacted headers, the reference's answer and timing, canary
                                     tag), at most ``proxy.max_copy_bytes`` each. Workers
                                     acknowledge and delete what they finished, so its length is
                                     the backlog: producers stop adding (and count the drops) at
                                     ``buffer.copies_maxlen`` entries or
                                     ``buffer.copies_max_bytes``; MAXLEN trimming is the last
                                     resort. Consumer group ``COPIES_GROUP``; a dead worker's
                                     pending entries are claimed by the others (XAUTOCLAIM).

``<ns>:builds:{ledger}``     ZSET    every build id, scored by when it was first seen.
``<ns>:builds:{ledger}:current``
                             HASH    ``<upstream>|<model>`` -> the build id it serves now.
``<ns>:builds:{ledger}:events``
                             LIST    the timeline, newest first (JSON: ts, upstream, model,
                                     build, previous): a build recorded the first time it
                                     answers and again whenever the fingerprint changes (a new
                                     version loaded, a config change); trimmed to
                                     ``BUILD_EVENTS_MAX``. No TTL.
``<ns>:builds:{ledger}:b:<id>``
                             HASH    one build: ``facts`` (JSON: the fingerprint), ``upstream``,
                                     ``model``, ``role`` (reference or candidate),
                                     ``first_seen``, ``last_seen``. No TTL.
``<ns>:builds:{ledger}:replays:<id>``
                             LIST    golden-set replay runs against the build (JSON: when, the
                                     golden set's id and size, per label which samples still
                                     diverge), newest first; trimmed to ``BUILD_REPLAYS_MAX``.

Hash tags (Redis Cluster puts a key in the slot of the part in its first braces): every
multi-key operation touches keys of one tag, and tags are per object, so load spreads.

- Per object: a sample's hash (``{<id>}``), a session, a rollout's state, decisions and evidence
  (``{<rollout>}``: its check-and-set watches the state and writes the log in one MULTI), a
  population cell's minutes and reservoir (``{<cell>}``).
- The sample index as one object (``{<ns>}``): the verdict stream, both indexes, the labels,
  the counters and the replay marks. The record script adds a verdict's stream entry, index
  entry and counters in one atomic call, deciding by the index (or the replay mark) whether the
  record is new, so these must share a slot. A sample's hash cannot share it (every sample
  would be on one node): on a cluster it is written first, by itself (``records``).
- The builds ledger as one object (``{ledger}``): a fingerprint change updates ``current``,
  the events and the build in one script. Builds are few (one per model version, hardware and
  config), so one slot holds them all.
- Single keys with no partner (``pop:cells``, ``copies``) carry no tag.

These formats changed before the first release (hash tags added); data written under the old
names is not read and needs no migration: it expires or can be flushed.

Readers use SCAN-free access paths (the stream and the index); nothing calls KEYS.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "sp:v1"
CANARY_DECISIONS_MAX = 1000
CANARY_EVIDENCE_TTL_S = 30 * 24 * 3600
# A replayed verdict's mark must outlive the longest a spooled segment may wait to be replayed
# again after a crash between writing it and deleting it (the next start of any process).
REPLAY_MARKER_TTL_S = 7 * 24 * 3600
# A stream worker's verdict can be written again only while its copy is still pending (a worker
# died before acknowledging it): an hour covers many claim periods, and keeps one short-lived
# mark per verdict rather than a week's worth.
WORKER_MARKER_TTL_S = 3600
# Paired differences kept per population cell for the Wilcoxon test (the newest).
POPULATION_PAIRS_MAX = 4096
# The consumer group of the comparison workers on the copies stream.
COPIES_GROUP = "compare"
# Build timeline events and replay runs kept per build (the newest).
BUILD_EVENTS_MAX = 10_000
BUILD_REPLAYS_MAX = 200
# Trimming an index looks at most this many labelled ids (kept) beyond the excess per write.
TRIM_SCAN_MAX = 1000

# Payload fields of a sample hash; ``meta`` and ``label`` are JSON, the rest raw bytes/JSON.
FIELD_META = "meta"
FIELD_SUMMARY = "summary"
FIELD_LABEL = "label"
PAYLOAD_FIELDS = (
    "request",
    "request_headers",
    "reference_body",
    "reference_headers",
    "candidate_body",
    "candidate_headers",
)


@dataclass(frozen=True, slots=True)
class KeySchema:
    namespace: str = DEFAULT_NAMESPACE

    @property
    def index_tag(self) -> str:
        """The hash tag of the sample index's keys (one slot: see the module docstring)."""
        return f"{{{self.namespace}}}"

    @property
    def verdicts(self) -> str:
        return f"{self.index_tag}:verdicts"

    @property
    def flagged(self) -> str:
        return f"{self.index_tag}:flagged"

    @property
    def kept(self) -> str:
        return f"{self.index_tag}:kept"

    @property
    def labels(self) -> str:
        return f"{self.index_tag}:labels"

    @property
    def stats(self) -> str:
        return f"{self.index_tag}:stats"

    @property
    def population_cells(self) -> str:
        return f"{self.namespace}:pop:cells"

    def population_bucket(self, cell: str, minute: int) -> str:
        return f"{self.namespace}:pop:{{{cell}}}:m:{minute}"

    def population_pairs(self, cell: str) -> str:
        return f"{self.namespace}:pop:{{{cell}}}:pairs"

    @property
    def copies(self) -> str:
        return f"{self.namespace}:copies"

    @property
    def builds(self) -> str:
        return f"{self.namespace}:builds:{{ledger}}"

    @property
    def builds_current(self) -> str:
        return f"{self.builds}:current"

    @property
    def builds_events(self) -> str:
        return f"{self.builds}:events"

    def build(self, build_id: str) -> str:
        return f"{self.builds}:b:{build_id}"

    def build_replays(self, build_id: str) -> str:
        return f"{self.builds}:replays:{build_id}"

    def sample(self, sample_id: str) -> str:
        return f"{self.namespace}:sample:{{{sample_id}}}"

    def sample_affixes(self) -> tuple[str, str]:
        """What comes before and after the id in a sample's key (the record script builds
        sample keys from ids)."""
        before, _, after = self.sample("\0").partition("\0")
        return before, after

    def replayed(self, sample_id: str) -> str:
        return f"{self.index_tag}:replayed:{sample_id}"

    def session(self, session_id: str) -> str:
        return f"{self.namespace}:session:{{{session_id}}}"

    def canary(self, rollout: str) -> str:
        return f"{self.namespace}:canary:{{{rollout}}}"

    def canary_channel(self, rollout: str) -> str:
        """The pub/sub channel a rollout's changes are announced on (a channel, not a key)."""
        return f"{self.namespace}:canary:{{{rollout}}}:changes"

    def canary_decisions(self, rollout: str) -> str:
        return f"{self.canary(rollout)}:decisions"

    def canary_evidence(self, rollout: str, attempt: int, step: int) -> str:
        return f"{self.canary(rollout)}:ev:{attempt}:{step}"


def outcome_stat(candidate: str, outcome: str) -> str:
    return f"{candidate}|{outcome}"


def flagged_stat(candidate: str, model: str, output: str) -> str:
    return f"{candidate}|{model}|{output}|flagged"


def spool_full_stat(candidate: str) -> str:
    return f"{candidate}|spool_full"
