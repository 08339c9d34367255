"""The accelerated canary schedule the canary tests share: evaluation every 50 ms, steps held
for ten samples and a fifth of a second."""

from __future__ import annotations

from typing import Any


def fast_canary(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "candidate": "cand",
        "steps": [50, 100],
        "min_samples": 10,
        "min_duration_s": 0.2,
        "interval_s": 0.05,
        "response_header": "X-Served-By",
        # Latency is not what most canary tests are about: two fakes on a busy test machine
        # differ by milliseconds; a latency test sets its own limit.
        "gates": {
            # A clean step passes from 9 compared requests (min_samples 10 governs), an always
            # flagged candidate fails at 9 (the sequential gate at 95%: gates.py); a candidate
            # without errors passes the error gate from 5 of its answers (at 50% a step of ten
            # requests has about five), one that always errs fails it at 17.
            "max_flagged_rate": 0.5,
            "max_error_rate_increase": 0.7,
            "latency_slack_ms": 1000,
            "ttft_slack_ms": 1000,
        },
    }
    config.update(overrides)
    return config
