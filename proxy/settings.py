"""One typed, validated settings object for the whole proxy, loaded from YAML.

``${VAR}`` and ``${VAR:-default}`` in string values expand from the environment. Unknown keys are
an error that names the key and the file. Secrets (the admin token, a Redis URL that may carry a
password) are ``SecretStr`` so they never show in a ``repr`` or a log line.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from comparators import MetricSpec, validate_spec

from .buffer.connect import check_url
from .errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MIN_TOKEN_CHARS = 16
"""Shorter tokens (and empty ones, e.g. from ``${UNSET:-}``) are refused: guessable."""


def _check_token(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value()) < MIN_TOKEN_CHARS:
        got = len(value.get_secret_value())
        raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters (got {got})")
    return value


# RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_GRPC_URL = re.compile(r"^(grpcs?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")
"""``host:port``, ``[v6]:port``, optionally ``grpc://`` or ``grpcs://`` in front."""


def _check_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


class ListenSettings(_Model):
    host: str = "127.0.0.1"
    """Address the data plane (what clients call) binds."""
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(None, ge=0, le=65535)
    """gRPC listener (KServe V2 / Triton ``GRPCInferenceService``, passed through to
    ``reference.grpc_url``) on ``host``; omitted: no gRPC listener."""


class UserSettings(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: SecretStr
    role: Literal["viewer", "reviewer", "admin"] = "viewer"
    """viewer: read; reviewer: read and label; admin: everything."""

    _token = field_validator("token")(_check_token)


class AdminSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    token: SecretStr | None = None
    """Bearer token for every admin route but the health checks (role admin). Required by
    ``serve``."""
    users: list[UserSettings] = []
    """Per-user tokens with roles; each label records who made it."""
    session_ttl_s: int = Field(12 * 3600, ge=60)
    """How long a browser login lasts."""
    tls_cert: Path | None = None
    """PEM certificate chain: serve the admin plane over TLS (with ``tls_key``); cookies then
    get ``Secure``."""
    tls_key: Path | None = None
    secure_cookies: bool = False
    """Mark the session cookie ``Secure`` although this process speaks plain HTTP, because a
    TLS-terminating proxy sits in front of it."""
    auth_failures_per_min: int = Field(30, ge=1)
    """Failed logins and bad bearer tokens allowed per client address per minute; beyond it,
    429. Only failures count, so a suite on one address or a Service in front of replicas does
    not trip it in normal use."""

    _token = field_validator("token")(_check_token)

    @model_validator(mode="after")
    def _tls_pair(self) -> AdminSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("admin.tls_cert and admin.tls_key: give both or neither")
        return self

    @field_validator("users")
    @classmethod
    def _distinct_users(cls, value: list[UserSettings]) -> list[UserSettings]:
        names = [u.name for u in value]
        tokens = [u.token.get_secret_value() for u in value]
        if len(set(names)) != len(names):
            raise ValueError("user names must be unique")
        if len(set(tokens)) != len(tokens):
            raise ValueError("each user needs their own token")
        return value


class UpstreamSettings(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    timeout_s: float = Field(60.0, gt=0)
    """Whole-request timeout. For the reference this bounds the live call."""
    connect_timeout_s: float = Field(5.0, gt=0)
    grpc_url: str | None = None
    """The server's gRPC endpoint: ``host:port`` (plaintext) or ``grpcs://host:port`` (TLS)."""
    grpc_ca: Path | None = None
    """PEM roots that verify a ``grpcs://`` server (omitted: the system's roots)."""
    grpc_cert: Path | None = None
    """PEM client certificate chain for mutual TLS (with ``grpc_key``)."""
    grpc_key: Path | None = None
    hardware: str | None = Field(None, max_length=200)
    """What this server runs on, as you name it (``"L4 x1, fp8"``): part of its build's
    fingerprint, so the same model version on two hardware pools is two builds."""
    metrics_url: str | None = None
    """The server's Prometheus metrics (Triton's ``http://host:8002/metrics``): the GPUs its
    ``nv_gpu_*`` series name become part of the build's fingerprint."""

    _url = field_validator("url")(_check_url)

    @field_validator("metrics_url")
    @classmethod
    def _metrics_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("grpc_url")
    @classmethod
    def _grpc_url(cls, value: str | None) -> str | None:
        if value is not None and not _GRPC_URL.match(value):
            raise ValueError(
                f"must be host:port or grpcs://host:port (no path, no http://), got {value!r}"
            )
        return value

    @field_validator("grpc_ca", "grpc_cert", "grpc_key")
    @classmethod
    def _pem_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _grpc_tls(self) -> UpstreamSettings:
        if (self.grpc_cert is None) != (self.grpc_key is None):
            raise ValueError("grpc_cert and grpc_key: give both or neither")
        tls_files = self.grpc_ca or self.grpc_cert
        if tls_files is not None and not (self.grpc_url or "").startswith("grpcs://"):
            raise ValueError(
                "grpc_ca, grpc_cert, grpc_key: need a grpcs:// grpc_url "
                f"(got {self.grpc_url!r}); plaintext gRPC would ignore them"
            )
        return self

    @property
    def grpc_target(self) -> str | None:
        """``host:port`` of the gRPC endpoint, without the scheme."""
        if self.grpc_url is None:
            return None
        return self.grpc_url.removeprefix("grpcs://").removeprefix("grpc://")

    @property
    def grpc_tls(self) -> bool:
        return self.grpc_url is not None and self.grpc_url.startswith("grpcs://")


class MirrorLlmSettings(_Model):
    allow: list[Literal["n", "best_of", "tools", "store"]] = []
    """LLM request features this candidate may be sent: ``n`` > 1 and ``best_of`` (n times the
    work), ``tools`` (a tool call may have side effects the proxy cannot know of), ``store``
    (the request kept server-side). A copy using one not allowed is skipped, counted."""


class CandidateSettings(UpstreamSettings):
    timeout_s: float = Field(5.0, gt=0)
    sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of mirrorable requests copied to this candidate."""
    sample_key_header: str | None = None
    """Sample by a stable hash of this header (a user or session id) instead of at random, so
    related requests are mirrored together or not at all."""
    max_in_flight: int = Field(64, ge=1)
    """Calls in flight to this candidate at once; a copy beyond it waits in the mirror queue."""
    model_map: dict[str, str] = {}
    """Reference model name -> the name this candidate serves it under."""
    models: list[str] = []
    """Reference models this candidate shadows; empty means every model."""
    noise_floor: bool = False
    """A second instance of the reference: its divergence is the noise floor, not a regression."""
    breaker_failures: int = Field(5, ge=1)
    """Consecutive connection failures that open this candidate's circuit: copies are then
    skipped (counted as ``dropped_circuit_open``) instead of paying for doomed connects."""
    breaker_open_s: float = Field(5.0, gt=0)
    """How long the circuit stays open before one copy probes the candidate again."""
    forward_credentials: bool = False
    """Send the client's Authorization and Cookie headers to this candidate too."""
    headers: dict[str, SecretStr] = {}
    """Headers sent with every copy to this candidate, replacing the client's of the same name:
    its own credentials (``Authorization: Bearer ${CANDIDATE_TOKEN}`` from a Secret). The only
    way a Redis-stream worker's copies carry credentials (the stream never holds the client's);
    never stored, logged or shown."""

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"the value of {name!r} holds a line break or NUL")
        return value

    llm_timeout_s: float = Field(120.0, gt=0)
    """The time limit of a copy of a generated-text call (Triton generate, OpenAI-compatible):
    a generation takes seconds to minutes where a tensor model takes milliseconds."""
    mirror_llm: MirrorLlmSettings = MirrorLlmSettings()

    def shadows(self, model: str) -> bool:
        return not self.models or model in self.models

    def served_name(self, model: str) -> str:
        return self.model_map.get(model, model)


class BufferSettings(_Model):
    redis_url: SecretStr | None = None
    """Omitted: the proxy runs an embedded Redis with its data under ``state_dir``. Else
    ``redis://``, ``rediss://``, ``unix://``, Sentinel
    (``redis+sentinel://[user:password@]host:port,host:port/service_name[/db]``, the sentinels'
    own password in ``?sentinel_password=``) or Cluster
    (``redis+cluster://[user:password@]host:port,host:port``); checked when loaded, without
    connecting (``proxy/buffer/connect.py``)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                check_url(value.get_secret_value())
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("buffer.redis_url: ")) from None
        return value

    state_dir: Path = Path(".state")
    stream_maxlen: int = Field(100_000, ge=100)
    """Verdicts kept in the stream (approximate trim)."""
    flagged_index_max: int = Field(100_000, ge=100)
    sample_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    """How long a stored sample (payloads included) lives unless labelled."""
    store_unflagged_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of unflagged comparisons whose full payloads are stored too (context for QA)."""
    write_timeout_s: float = Field(1.0, gt=0)
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=0)
    """Request/response bodies above this are stored truncated (and marked so)."""
    labelled_ttl_s: int = Field(90 * 24 * 3600, ge=60)
    """How long a labelled sample (payloads, label, scores) lives after labelling; exporting it
    gives it ``sample_ttl_s`` back."""
    spool_dir: Path | None = None
    """Where verdicts and samples wait on disk while Redis is unreachable; replayed oldest first
    when it returns, and on the next start. Omitted: ``state_dir/spool``."""
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    """Disk the spool may use; what does not fit is counted as ``spool_full`` and lost."""
    stats_retention_min: int = Field(24 * 60, ge=1, le=31 * 24 * 60)
    """Minutes of population statistics (per-minute buckets in Redis) kept: the longest window
    ``/api/summary`` and the noise floor can look back over."""
    copies_maxlen: int = Field(10_000, ge=100)
    """``proxy.compare: redis``: the backlog of copies the stream may hold (workers delete what
    they finished); at it, producers drop new copies and count them (``dropped_stream_full``),
    and the stream's own MAXLEN trim is only the last resort."""
    copies_max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    """And the bytes it may hold (Redis's own accounting of the stream): beyond it producers
    drop new copies and count them (``dropped_stream_full``) until workers catch up."""
    copies_claim_idle_s: float = Field(30.0, gt=0)
    """A copy a worker took and has not acknowledged for this long is claimed by another
    worker (the first presumably died) and compared there."""
    spool_fsync: Literal["batch", "always", "never"] = "batch"
    """``batch``: fsync once per batch of records written (a crash loses at most the batch being
    written); ``always``: after every record; ``never``: leave it to the OS."""

    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.state_dir / "spool"


class RedactSettings(_Model):
    """What never rests anywhere (Redis, spool, exports, logs, spans, links between processes)."""

    headers: list[str] = []
    """Headers dropped besides the credential headers that always are (Authorization,
    Proxy-Authorization, Cookie, Set-Cookie)."""
    inputs: list[str] = []
    """Input tensor names whose values are replaced by a keyed hash before storage."""
    outputs: list[str] = []
    """Output tensor names whose values are replaced by a keyed hash before storage."""
    json_pointers: list[str] = []
    """For JSON APIs: RFC 6901 paths (``/user/email``) in request and answer bodies replaced by
    a keyed hash before storage."""
    secret: SecretStr | None = None
    """HMAC key for those hashes (required when any is named), so low-entropy values cannot be
    recovered by hashing guesses."""
    store_payloads: bool = True
    """False keeps scores and metadata only: no request or answer bodies are stored."""

    _secret = field_validator("secret")(_check_token)

    @field_validator("json_pointers")
    @classmethod
    def _pointers(cls, value: list[str]) -> list[str]:
        for ptr in value:
            if not ptr.startswith("/"):
                raise ValueError(f"{ptr!r} is not a JSON pointer (RFC 6901: starts with '/')")
        return value

    @model_validator(mode="after")
    def _secret_needed(self) -> RedactSettings:
        if (self.inputs or self.outputs or self.json_pointers) and self.secret is None:
            raise ValueError(
                "redact.secret: required when inputs, outputs or json_pointers are named"
            )
        return self

    def hashes_values(self) -> bool:
        return bool(self.inputs or self.outputs or self.json_pointers)


class TelemetrySettings(_Model):
    service_name: str = "shadowproxy"
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); traces and metrics go there."""
    otlp_metrics_interval_s: float = Field(15.0, gt=0)


class NoiseSettings(_Model):
    """How verdicts are judged against the noise floor (a ``noise_floor`` candidate's A/A)."""

    mode: Literal["threshold_and_noise", "threshold_only", "noise_only"] = "threshold_and_noise"
    """Flag when the comparator's threshold fires and the sample lies beyond the noise floor
    (the threshold alone until a floor exists); or on one rule only."""
    quantile: float = Field(0.99, gt=0, le=1)
    """The A/A quantile that bounds noise."""
    margin: float = Field(1.5, ge=1)
    """Beyond noise means severity > margin x the A/A quantile."""
    min_samples: int = Field(30, ge=1)
    window_min: int = Field(60, ge=1, le=7 * 24 * 60)
    """Minutes of A/A verdicts the floor is made of: every replica's and worker's, as kept in
    Redis (``buffer.stats_retention_min`` must keep at least as many)."""


class ProxySettings(_Model):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=2**31 - 1)
    """Largest request body accepted (Triton's own default is 64 MiB), and the largest gRPC
    message either way on the gRPC listener and its channels (gRPC's own default is 4 MiB;
    Triton and tritonclient allow up to 2 GiB - 1, the most gRPC can)."""
    compare_workers: int = Field(2, ge=1, le=64)
    """Threads that decode and compare, off the event loop."""
    drain_timeout_s: float = Field(10.0, ge=0)
    """On shutdown, how long in-flight mirrors may finish before they are cancelled."""
    request_id_header: str = "X-Request-Id"
    mirror_process: bool = True
    """Run mirroring (candidate calls, comparison, storage) in a worker process at lower CPU
    priority, so shadow work cannot take the live path's event loop, GIL or CPU. False runs it
    in the live process (simpler to debug; the demo and most tests do)."""
    mirror_cpu_budget: float = Field(0.5, ge=0)
    """CPU cores the compare workers may use together (shared among ``mirror_workers``); beyond
    it, copies wait in the mirror queue. Shadow work then cannot crowd the live path off a small
    host. 0 means no budget."""
    compare: Literal["local", "redis"] = "local"
    """``local``: this proxy calls the candidates and compares (its mirror process). ``redis``:
    it only appends each sampled copy (request, the reference's answer and timing, canary tag;
    redacted) to the copies stream, and ``shadowproxy worker`` processes, anywhere, call the
    candidates, compare and store: their count is the knob for coverage."""
    max_copy_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """``compare: redis``: a copy larger than this (request and answer together) is not appended
    and is counted as ``dropped_copy_too_large``."""
    mirror_workers: int = Field(1, ge=1, le=64)
    """Compare worker processes behind the mirror process (each at idle CPU priority): a host
    with spare cores compares more. Not ``serve --workers``, which runs live processes."""
    mirror_queue_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of copies the mirror queue holds while they wait for a call slot or for CPU; a copy
    that would not fit is dropped and counted as ``dropped_queue_bytes``."""
    mirror_queue_age_s: float = Field(30.0, gt=0)
    """A copy still waiting after this long is dropped and counted as ``dropped_queue_age``."""
    fast_lane: bool = True
    """Serve HTTP/1.1 infer calls (one Content-Length, up to 16 MiB, not in a canary split) and
    GET reads on a bare asyncio protocol with pooled connections to the reference: about 40% of
    aiohttp's CPU per request. Other requests, and an https reference, go through aiohttp."""
    grpc_relay: bool = True
    """Relay each gRPC client connection frame for frame over a connection of its own to the
    reference, reading only header blocks and the messages it copies: a fraction of the CPU of
    terminating every call in ``grpc.aio`` (a ``grpcs://`` reference is relayed to over TLS). A
    canary needs calls terminated, and then (or with this off) the ``grpc.aio`` listener serves
    every call."""
    max_inflated_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    """Largest a compressed body (client request, reference or candidate answer) may inflate to
    for comparison; beyond it the copy is skipped and counted, and the live request is forwarded
    untouched."""
    max_answer_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest candidate answer read; a longer one is cut off and counted as a failed call."""
    max_outputs: int = Field(1024, ge=1)
    """Outputs of one answer that are stored (all are compared; the rest are counted as
    ``outputs_dropped``). An answer with more than 1024 outputs is not decoded at all."""
    max_id_chars: int = Field(256, ge=8)
    """Request ids (body ``id``, the request-id header) longer than this are cut before storage."""
    max_connections: int = Field(10_000, ge=1)
    """Client connections the data plane holds at once; beyond it new ones are closed."""
    head_timeout_s: float = Field(10.0, gt=0)
    """A client must send a whole request head within this (slowloris)."""
    idle_timeout_s: float = Field(75.0, gt=0)
    """A keep-alive client connection idle this long is closed."""
    max_unsent_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    """Answer bytes a client has not read yet before the proxy stops reading its next requests."""
    shed_lag_ms: float = Field(4.0, ge=0)
    """When the live process's event loop runs this many ms late (it is CPU-bound), new mirror
    copies are dropped and counted as ``dropped_overload``; live traffic keeps the CPU. 0
    disables. (The shadow processes' own lag is no reason to drop: their copies queue.)"""


class CanaryGates(_Model):
    """What each canary step must show before it advances; any failure rolls back at once."""

    max_flagged_rate: float = Field(0.05, ge=0, le=1)
    """The flagged rate (share of compared requests flagged as divergent) this step may have: a
    sequential test fails it as soon as the evidence says the rate is above, and passes it (from
    ``min_samples`` on) once the evidence says it is below (``proxy/canary/gates.py``)."""
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    """The candidate's error rate (transport failures and 5xx) may exceed the reference's by at
    most this, judged by the same sequential test."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """One-sided confidence of each rate gate's verdicts, whatever the number of evaluations: a
    sound candidate is rolled back, and an unsound one passed, each with probability at most
    ``1 - confidence``."""
    max_latency_p99_ratio: float = Field(1.5, gt=0)
    """Candidate p99 <= ratio x reference p99 + ``latency_slack_ms`` on the same requests."""
    latency_slack_ms: float = Field(5.0, ge=0)
    max_ttft_ratio: float = Field(1.5, gt=0)
    """LLM calls: candidate time to first token (high quantile) <= ratio x the reference's +
    ``ttft_slack_ms``, on the same requests; skipped where no answer streamed tokens."""
    ttft_slack_ms: float = Field(20.0, ge=0)
    min_semantic_similarity: float | None = Field(None, ge=-1, le=1)
    """LLM calls with ``semantic`` configured: the ``semantic_quantile`` of the answers' cosine
    must reach this (e.g. 0.9 at the 10th percentile); None: no such gate."""
    semantic_quantile: float = Field(0.1, gt=0, lt=1)
    paired_alpha: float = Field(0.01, gt=0, lt=1)
    """Where a noise-floor twin answers the same requests: the step fails when McNemar's test says
    the candidate is flagged more often than the twin at this significance."""
    min_pairs: int = Field(20, ge=1)
    """Paired (candidate, twin) outputs needed before the paired test decides anything."""


class CanarySettings(_Model):
    """A progressive rollout: a growing share of live requests answered by one candidate."""

    candidate: str
    """The candidate (by name) that serves the canary share; it must not be a noise floor."""
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the rollout in Redis (default: the candidate's name). A new id starts a new rollout;
    the same id resumes where it was, across restarts and replicas."""
    steps: list[float] = [1.0, 5.0, 25.0, 50.0, 100.0]
    """Percent of eligible live requests the candidate answers, step by step; the last promotes."""
    min_samples: int = Field(200, ge=1)
    """Compared requests a step needs before its gates can pass (fewer: it waits, and says so)."""
    min_duration_s: float = Field(300.0, ge=0)
    """And the least time each step is held."""
    split: bool = True
    """False: this proxy never answers from the candidate and never advances the rollout (an
    external controller such as Flagger or Argo Rollouts moves the traffic); it still gathers the
    evidence, fails the rollout on a failed gate, and answers the webhook and web-metric routes."""
    sticky_header: str | None = None
    """Split by a stable hash of this header (a user or session id): the same key always lands on
    the same side, and stays on the candidate as the weight grows. Absent: at random."""
    response_header: str | None = None
    """When set, each canary-eligible response carries this header naming who answered."""
    approve_before: list[float] = []
    """Weights that wait for a person (``canary resume``) before the rollout moves to them;
    include 100 to approve the promotion."""
    interval_s: float = Field(5.0, gt=0)
    """How often each replica reads the rollout from Redis and evaluates the gates."""
    stale_after_s: float = Field(30.0, gt=0)
    """If the rollout cannot be read from Redis for this long, this replica serves everything
    from the reference until it can (the live path never waits on Redis)."""
    gates: CanaryGates = CanaryGates()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one step")
        if any(not 0 < w <= 100 for w in value):
            raise ValueError("each step is a percentage in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("steps must increase")
        return value

    @model_validator(mode="after")
    def _approvals_are_steps(self) -> CanarySettings:
        unknown = [w for w in self.approve_before if w not in self.steps]
        if unknown:
            raise ValueError(f"approve_before: {unknown} are not among the steps {self.steps}")
        return self

    @property
    def rollout_id(self) -> str:
        return self.id or self.candidate


class SemanticSettings(_Model):
    """Semantic similarity of generated answers (opt-in: an inference per compared copy)."""

    embedding_url: str = Field(pattern=r"^https?://")
    """A V2 server (Triton) or an OpenAI-compatible one (``api: openai``): its base URL."""
    embedding_model: str = Field(min_length=1)
    api: Literal["v2", "openai"] = "v2"
    embedding_input: str = "text"
    """V2: the model's BYTES input that takes the texts."""
    embedding_output: str = "embedding"
    """V2: the model's FP32 output of one vector per text."""
    timeout_s: float = Field(10.0, gt=0)


class Settings(_Model):
    listen: ListenSettings = ListenSettings()
    admin: AdminSettings = AdminSettings()
    reference: UpstreamSettings
    candidates: list[CandidateSettings] = []
    buffer: BufferSettings = BufferSettings()
    comparisons: dict[str, dict[str, dict[str, Any]]] = {"*": {"*": {"metric": "auto"}}}
    """model -> output -> {metric, thresholds...}; ``"*"`` is the default at both levels."""
    noise: NoiseSettings = NoiseSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    proxy: ProxySettings = ProxySettings()
    redact: RedactSettings = RedactSettings()
    canary: CanarySettings | None = None
    """A progressive rollout of one candidate; absent, every live request goes to the reference."""
    semantic: SemanticSettings | None = None
    """Embed both answers of each compared LLM copy and score their cosine (``semantic``)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, value: list[CandidateSettings]) -> list[CandidateSettings]:
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique, repeated: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _grpc_reference(self) -> Settings:
        if self.listen.grpc_port is not None and self.reference.grpc_url is None:
            raise ValueError(
                "listen.grpc_port: set, but reference.grpc_url is not: the gRPC listener "
                "needs a reference to forward to"
            )
        return self

    @model_validator(mode="after")
    def _noise_window_kept(self) -> Settings:
        if self.noise.window_min > self.buffer.stats_retention_min:
            raise ValueError(
                f"noise.window_min: {self.noise.window_min} minutes, but "
                f"buffer.stats_retention_min keeps only {self.buffer.stats_retention_min}"
            )
        return self

    @model_validator(mode="after")
    def _canary_candidate(self) -> Settings:
        if self.canary is None:
            return self
        names = [c.name for c in self.candidates]
        if self.canary.candidate not in names:
            raise ValueError(
                f"canary.candidate: {self.canary.candidate!r} is not a configured candidate "
                f"(have: {', '.join(names) or 'none'})"
            )
        if self.candidate(self.canary.candidate).noise_floor:
            raise ValueError("canary.candidate: a noise_floor twin cannot be rolled out")
        return self

    @field_validator("comparisons")
    @classmethod
    def _valid_specs(
        cls, value: dict[str, dict[str, dict[str, Any]]]
    ) -> dict[str, dict[str, dict[str, Any]]]:
        for model, outputs in value.items():
            for output, raw in outputs.items():
                params = dict(raw)
                metric = str(params.pop("metric", "auto"))
                try:
                    validate_spec(MetricSpec(metric, params))
                except ValueError as exc:
                    raise ValueError(f"[{model!r}][{output!r}]: {exc}") from None
        return value

    def mirrors(self, model: str | None) -> bool:
        """Whether any candidate may take a copy of a request to ``model`` (no body needed);
        None: the model is not known yet (an OpenAI call names it in its body), so any
        candidate might."""
        return any(
            c.sample_rate > 0 and (model is None or c.shadows(model)) for c in self.candidates
        )

    def canary_serves(self, model: str) -> bool:
        """Whether live requests to ``model`` take part in the canary split."""
        return self.canary is not None and self.candidate(self.canary.candidate).shadows(model)

    def candidate(self, name: str) -> CandidateSettings:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)


def _protect_env_refs(text: str) -> tuple[str, dict[str, str]]:
    """Swap each ``${...}`` for a plain token before YAML parsing.

    The documented example ``admin: {token: ${TOKEN}}`` is not valid YAML as written (a ``{``
    inside a flow mapping); users copy it, so references are protected and expanded per key later.
    """
    refs: dict[str, str] = {}

    def swap(m: re.Match[str]) -> str:
        token = f"__shadowproxy_env_{len(refs)}__"
        refs[token] = m.group(0)
        return token

    return _ENV.sub(swap, text), refs


def expand_env(value: Any, path: str = "", refs: Mapping[str, str] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string; an unset VAR names its key."""
    if isinstance(value, str):
        for token, ref in (refs or {}).items():
            value = value.replace(token, ref)

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")

        return _ENV.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k), refs) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", refs) for i, v in enumerate(value)]
    return value


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        key = key.replace(".[", "[") or "<root>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        # Cross-key checks (``model_validator``) name their keys in the message themselves.
        lines.append(f"{source}: {key}: {msg}" if key != "<root>" else f"{source}: {msg}")
    return "\n".join(lines)


def settings_from_mapping(
    data: Mapping[str, Any], source: str = "<config>", refs: Mapping[str, str] | None = None
) -> Settings:
    try:
        expanded = expand_env(data, "", refs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return Settings.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def load_settings(path: str | Path) -> Settings:
    """Read, expand and validate a YAML config file; every error names the file and the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror})") from None
    protected, refs = _protect_env_refs(text)
    try:
        data = yaml.safe_load(protected)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{p}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return settings_from_mapping(data, str(p), refs)
