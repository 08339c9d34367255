"""Coverage arithmetic: fates per candidate, the recent window, and the advice it gives."""

from __future__ import annotations

from collections import Counter

from proxy.shadow.coverage import CoverageWindow, fates_of
from tests.conftest import make_settings


def _settings() -> object:
    return make_settings(
        "http://127.0.0.1:1",
        None,
        candidates=[
            {"name": "a", "url": "http://127.0.0.1:2"},
            {"name": "b", "url": "http://127.0.0.1:3"},
        ],
    )


def test_fates_leave_out_skips_and_storage_counts() -> None:
    fates = fates_of(
        [
            ("a", "compared", 5),
            ("a", "status_mismatch", 1),
            ("a", "skipped:sequence", 7),
            ("a", "stored", 6),
            ("a", "dropped_queue_age", 2),
            ("a", "timeout", 1),
            ("a", "compared", 1),
        ]
    )
    assert fates == {"a": Counter(compared=6, status_mismatch=1, dropped_queue_age=2, timeout=1)}


def test_recent_coverage_is_the_difference_over_the_window_and_names_the_setting() -> None:
    window = CoverageWindow(_settings(), span_s=100, started=-60.0)  # type: ignore[arg-type]
    window.observe({"a": Counter(compared=100)}, now=0.0)
    report = window.report(
        {"a": Counter(compared=150, dropped_queue_age=50), "b": Counter(compared=10)}, now=120.0
    )
    a = report["a"]
    assert (a["sampled"], a["compared"], a["coverage"]) == (200, 150, 0.75)
    # The last observation at least 100 s old (t = 0) is where "recent" starts.
    assert a["recent"] == {"window_s": 120.0, "sampled": 100, "compared": 50, "coverage": 0.5}
    assert "proxy.mirror_cpu_budget" in a["warning"] and "proxy.mirror_workers" in a["warning"]
    # Too few copies in the window to judge: no warning, whatever the ratio.
    assert report["b"]["warning"] is None and report["b"]["coverage"] == 1.0


def test_advice_follows_the_commonest_loss() -> None:
    cases = {
        "dropped_queue_bytes": "proxy.mirror_queue_bytes",
        "dropped_overload": "proxy.shed_lag_ms",
        "dropped_circuit_open": "is it up?",
        "timeout": "timeout_s",
        "dropped_worker_down": "mirror process",
    }
    for reason, words in cases.items():
        window = CoverageWindow(_settings())  # type: ignore[arg-type]
        report = window.report({"a": Counter(compared=10, **{reason: 90})})
        assert words in report["a"]["warning"], (reason, report["a"]["warning"])


def test_until_the_window_is_full_recent_means_since_the_start() -> None:
    window = CoverageWindow(_settings(), started=0.0)  # type: ignore[arg-type]
    report = window.report({"a": Counter(compared=10, dropped_queue_age=30)}, now=60.0)
    assert report["a"]["recent"]["sampled"] == 40 and report["a"]["recent"]["coverage"] == 0.25
    assert report["a"]["warning"].startswith("a: 25% of copies compared over the last 60 s")
