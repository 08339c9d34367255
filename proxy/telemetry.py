"""OpenTelemetry providers and the proxy's instruments, owned by one ``Telemetry`` object.

No globals: the providers are created here, handed to whoever records, and shut down by the app's
cleanup context. Metrics are read by a Prometheus reader on a private registry (served as text on
the admin plane's ``/metrics``) and, when ``telemetry.otlp_endpoint`` is set, pushed over OTLP/HTTP
with the traces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, CallbackT, Histogram, Observation
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as PrometheusHistogram

from .settings import TelemetrySettings

# Seconds: the live path lives in the sub-millisecond to seconds range.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
_LIVE_LATENCY = "Reference (live) upstream latency"
_DIVERGENCE_LABELS = ("candidate", "model", "output", "metric", "noise_floor")
# Divergence severities span many decades (1e-9 noise to 1+ for flips), so log-spaced buckets.
DIVERGENCE_BUCKETS = (0.0, 1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1.0, 10.0)


class Telemetry:
    def __init__(
        self, settings: TelemetrySettings, *, span_exporter: SpanExporter | None = None
    ) -> None:
        resource = Resource.create({"service.name": settings.service_name})
        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [
            PrometheusMetricReader(
                registry=self.registry, disable_target_info=True, scope_info_enabled=False
            )
        ]
        # Without anywhere to send spans, record only what a caller asked to sample: span ids
        # still propagate (traceparent is forwarded with our span as parent, the caller's sampled
        # flag kept) but no span data is built for unsampled traffic.
        exporting = span_exporter is not None or bool(settings.otlp_endpoint)
        self.exporting = exporting
        self.otlp = bool(settings.otlp_endpoint)
        """Metrics go out over OTLP too: histograms are then OTel's."""
        """Spans go somewhere: the live path builds one for every request, not only sampled ones."""
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF)
        )
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            base = settings.otlp_endpoint.rstrip("/")
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
                    export_interval_millis=settings.otlp_metrics_interval_s * 1000,
                )
            )
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
            )
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
            views=[
                View(
                    instrument_name="shadowproxy_divergence",
                    aggregation=ExplicitBucketHistogramAggregation(DIVERGENCE_BUCKETS),
                ),
                View(
                    instrument_name="shadowproxy_*latency*",
                    aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
                ),
            ],
        )
        self.tracer: Tracer = self.tracer_provider.get_tracer("shadowproxy")
        self.propagator: TextMapPropagator = TraceContextTextMapPropagator()
        meter = self._meter = self.meter_provider.get_meter("shadowproxy")
        # The two counters the live path bumps per request are plain dicts, read at collection:
        # a synchronous OTel instrument costs 15 us a call, a dict increment 0.1 us.
        self._request_counts: Counter[tuple[str, int]] = Counter()
        meter.create_observable_counter(
            "shadowproxy_requests",
            callbacks=[self._observe_requests],
            description="Live requests by route kind and status class",
        )
        self._link_counts: Counter[tuple[str, str]] = Counter()
        # What the shadow side counts per copy is a dict too, and its histograms are
        # prometheus_client's unless OTLP reads them (``_Histogram``): a compared copy records
        # a handful of each, and through OTel they cost about a tenth of a compare worker.
        self._mirror_counts = self._dict_counter(
            "shadowproxy_mirror_outcomes",
            "What happened to each copy offered to a candidate, by outcome",
            ("candidate", "outcome"),
        )
        self._skip_counts = self._dict_counter(
            "shadowproxy_mirror_skipped",
            "Requests never mirrored, by reason",
            ("reason", "candidate"),
        )
        # Live and shadow latency are separate instruments: with mirroring in a worker process
        # each process exports its own, and one metric family must come from one process.
        # Made on first use: a process that records none must not list the family.
        self._live_latency = _Histogram(
            self,
            "shadowproxy_live_latency",
            _LIVE_LATENCY,
            ("side", "upstream"),
            LATENCY_BUCKETS,
            "s",
        )
        self._shadow_latency = _Histogram(
            self,
            "shadowproxy_shadow_latency",
            "Candidate (shadow) latency",
            ("side", "upstream"),
            LATENCY_BUCKETS,
            "s",
        )
        meter.create_observable_counter(
            "shadowproxy_mirror_link_dropped",
            callbacks=[self._observe_link_drops],
            description="Copies the live process could not hand to the mirror worker, by reason",
        )
        self._divergence = _Histogram(
            self,
            "shadowproxy_divergence",
            "Per-output divergence severity (0 = identical) per candidate",
            _DIVERGENCE_LABELS,
            DIVERGENCE_BUCKETS,
            "",
        )
        self._flagged_counts = self._dict_counter(
            "shadowproxy_flagged", "Outputs flagged as divergent", _DIVERGENCE_LABELS
        )
        self._stored_counts = self._dict_counter(
            "shadowproxy_samples_stored",
            "Verdicts written to Redis, by result",
            ("candidate", "result"),
        )
        self._canary_served = meter.create_counter(
            "shadowproxy_canary_served",
            description="Live requests in the canary split, by who answered them",
        )
        self._canary_decisions = meter.create_counter(
            "shadowproxy_canary_decisions", description="Canary decisions taken here, by outcome"
        )
        self._canary_unflushed = meter.create_counter(
            "shadowproxy_canary_evidence_unflushed",
            description="Canary evidence counts a Redis write failed for (retried, or dropped "
            "when Redis may have applied them)",
        )
        # Plain in-process tallies for /api/summary and the demo report (cheap, no export).
        self.tally: Counter[tuple[str, str]] = Counter()

    # Recording helpers: one place that names attributes, so dashboards stay consistent.
    def request(self, route_kind: str, status: int) -> None:
        self._request_counts[(route_kind, status)] += 1

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        by_class: Counter[tuple[str, str]] = Counter()
        for (route, status), n in list(self._request_counts.items()):
            by_class[(route, f"{status // 100}xx")] += n
        return [Observation(n, {"route": r, "status_class": c}) for (r, c), n in by_class.items()]

    def _dict_counter(
        self, name: str, description: str, labels: tuple[str, ...]
    ) -> Counter[tuple[str, ...]]:
        """A counter bumped as a dict and read at collection (0.1 us where OTel's took 15)."""
        counts: Counter[tuple[str, ...]] = Counter()

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(n, dict(zip(labels, k, strict=True))) for k, n in list(counts.items())
            ]

        self._meter.create_observable_counter(name, callbacks=[observe], description=description)
        return counts

    def mirror(self, candidate: str, outcome: str, n: int = 1) -> None:
        self._mirror_counts[(candidate, outcome)] += n
        self.tally[(candidate, outcome)] += n

    def skipped(self, reason: str, candidate: str = "*") -> None:
        self._skip_counts[(reason, candidate)] += 1
        self.tally[(candidate, f"skipped:{reason}")] += 1

    def latency(self, side: str, upstream: str, seconds: float) -> None:
        # "reference" and "canary" are live calls; "candidate" (and a reversed "reference_shadow")
        # are shadow calls, recorded by the process that makes them.
        if side in ("reference", "canary"):
            self._live_latency.record(seconds, (side, upstream))
        else:
            self._shadow_latency.record(seconds, (side, upstream))

    def link_dropped(self, reason: str, candidate: str, n: int = 1) -> None:
        """A copy for ``candidate`` the live process dropped before the mirror process saw it
        (or, ``worker_lost``, that a mirror process held when it died)."""
        self._link_counts[(reason, candidate)] += n
        self.tally[(candidate, f"dropped_{reason}")] += n

    def divergence(self, attrs: tuple[str, ...], severity: float, flagged: bool) -> None:
        """One output's verdict; ``attrs`` in the order of ``_DIVERGENCE_LABELS``."""
        self._divergence.record(severity, attrs)
        if flagged:
            self._flagged_counts[attrs] += 1

    def stored(self, candidate: str, ok: bool, n: int = 1) -> None:
        result = "stored" if ok else "store_failed"
        self._stored_counts[(candidate, result)] += n
        self.tally[(candidate, result)] += n

    def canary_served(self, rollout: str, side: str, fallback: bool = False) -> None:
        self._canary_served.add(
            1, {"rollout": rollout, "side": side, "fallback": str(fallback).lower()}
        )

    def canary_decision(self, rollout: str, outcome: str) -> None:
        self._canary_decisions.add(1, {"rollout": rollout, "outcome": outcome})

    def canary_evidence_unflushed(self, n: int) -> None:
        self._canary_unflushed.add(n)

    def _observe_link_drops(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"reason": r, "candidate": c})
            for (r, c), n in list(self._link_counts.items())
        ]

    def gauge(self, name: str, description: str, callback: CallbackT) -> None:
        """A gauge read at collection time (population statistics live with their owner)."""
        self._meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def prometheus_text(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def merge_prometheus_text(texts: Iterable[str]) -> str:
    """One exposition from several processes' (live, mirror, compare workers), each family once.

    Counters and histograms of one family may come from several processes (every compare worker
    counts its comparisons): samples with the same name and labels are summed. For a gauge the
    last process's value stands (each gauge has one owner, so this only orders them).
    """
    order: list[str] = []
    comments: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in comments:
                        order.append(family)
                        comments[family] = []
                        samples[family] = {}
                    if parts[1] == "TYPE":
                        kinds[family] = parts[3] if len(parts) > 3 else "untyped"
                    if line not in comments[family]:
                        comments[family].append(line)
                continue
            if not line.strip() or not family:
                continue
            key, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            seen = samples[family]
            if kinds.get(family) == "gauge" or key not in seen:
                seen[key] = number
            else:
                seen[key] += number
    out: list[str] = []
    for family in order:
        out += comments[family]
        out += [f"{key} {_number(value)}" for key, value in samples[family].items()]
    return "\n".join(out) + "\n" if out else ""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Histogram:
    """A histogram family with labels: OTel's when OTLP reads it, else prometheus_client's
    (2 us a record where OTel's cost 15-30 us), the same family on /metrics either way. Made on
    first use, so a process that records none does not list it."""

    def __init__(
        self,
        tel: Telemetry,
        name: str,
        description: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        unit: str,
    ) -> None:
        self._tel = tel
        self._name = name
        self._description = description
        self._labels = labels
        self._buckets = buckets
        self._unit = unit
        self._otel: Histogram | None = None
        self._prometheus: PrometheusHistogram | None = None
        self._children: dict[tuple[str, ...], Any] = {}

    def record(self, value: float, attrs: tuple[str, ...]) -> None:
        child = self._children.get(attrs)
        if child is None:
            child = self._children[attrs] = self._child(attrs)
        if self._otel is not None:
            self._otel.record(value, child)
        else:
            child.observe(value)

    def _child(self, attrs: tuple[str, ...]) -> Any:
        if self._tel.otlp:
            if self._otel is None:
                self._otel = self._tel._meter.create_histogram(
                    self._name, unit=self._unit, description=self._description
                )
            return dict(zip(self._labels, attrs, strict=True))
        if self._prometheus is None:
            self._prometheus = PrometheusHistogram(
                self._name,
                self._description,
                list(self._labels),
                unit="seconds" if self._unit == "s" else "",
                buckets=self._buckets,
                registry=self._tel.registry,
            )
        return self._prometheus.labels(*attrs)
