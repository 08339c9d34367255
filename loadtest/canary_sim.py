"""The canary's rate gates under repeated looks: simulated rollouts through the gate code itself.

``python -m loadtest.canary_sim [--rollouts 1000] [--batch 10] [--max-samples 3000]``

Each rollout draws compared requests at a true flagged rate ``p``, ``--batch`` per evaluation
interval, and asks ``proxy.canary.gates.evaluate`` (the controller's own function, default
``CanaryGates``: limit 5%, confidence 95%, ``min_samples`` 200) after every batch, until the
flagged-rate gate fails (a rollback) or passes, or ``--max-samples`` is reached. Printed per
``p``: the share of rollouts rolled back and passed, and the compared requests each took.

The design's promises, stated before running: at ``p <= limit`` the share rolled back stays under
``1 - confidence`` however many looks (a mixture martingale and Ville's inequality); at
``p = 2 x limit`` a rollback comes after about ``(ln(1/alpha) + ln(RATE_GRID)) / KL(2L || L)``
compared requests on average. For comparison, the rule before this change (a one-sided Wilson
bound at every look, failing from 3 events) is simulated on the same draws.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Callable

from comparators.population import wilson_interval
from proxy.canary import gates as g
from proxy.settings import CanaryGates

MIN_SAMPLES = 200


def predicted_rollback_samples(limit: float, confidence: float) -> float:
    """The design's expected sample count to roll back at twice the limit."""
    p, q = 2 * limit, limit
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return (math.log(1 / (1 - confidence)) + math.log(g.RATE_GRID)) / kl


def sequential(gates: CanaryGates) -> Callable[[int, int], str]:
    def decide(k: int, n: int) -> str:
        result = g.evaluate(
            {g.COMPARED: n, g.FLAGGED: k},
            gates,
            min_samples=MIN_SAMPLES,
            elapsed_s=1e9,
            min_duration_s=0,
            has_twin=False,
        )
        return next(r.status for r in result.gates if r.gate == "flagged_rate")

    return decide


def previous_rule(gates: CanaryGates) -> Callable[[int, int], str]:
    """The fixed-confidence Wilson rule the gates applied before (for comparison only)."""
    z = statistics.NormalDist().inv_cdf(gates.confidence)

    def decide(k: int, n: int) -> str:
        low, high = wilson_interval(k, n, z)
        if low > gates.max_flagged_rate and (k >= 3 or n >= MIN_SAMPLES):
            return "fail"
        if n >= MIN_SAMPLES and high <= gates.max_flagged_rate:
            return "pass"
        return "wait"

    return decide


def simulate(
    p: float, decide: Callable[[int, int], str], rollouts: int, batch: int, cap: int, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    fails: list[int] = []
    passes: list[int] = []
    for _ in range(rollouts):
        k = n = 0
        status = "wait"
        while status == "wait" and n < cap:
            k += sum(rng.random() < p for _ in range(batch))
            n += batch
            status = decide(k, n)
        if status == "fail":
            fails.append(n)
        elif status == "pass":
            passes.append(n)
    return {
        "rolled_back": len(fails) / rollouts,
        "passed": len(passes) / rollouts,
        "n_fail": _quantiles(fails),
        "n_pass": _quantiles(passes),
    }


def _quantiles(xs: list[int]) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return f"median {xs[len(xs) // 2]}, p95 {xs[min(len(xs) - 1, int(0.95 * len(xs)))]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10, help="compared requests per look")
    parser.add_argument("--max-samples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    gates = CanaryGates()
    limit, alpha = gates.max_flagged_rate, 1 - gates.confidence
    print(
        f"limit {limit:.0%}, confidence {gates.confidence:.0%} (false verdicts <= {alpha:.0%}), "
        f"min_samples {MIN_SAMPLES}, {args.batch} compared per look, "
        f"{args.rollouts} rollouts, at most {args.max_samples} samples each"
    )
    expected = predicted_rollback_samples(limit, gates.confidence)
    print(f"design: rollback at p = 2 x limit after ~{expected:.0f} compared requests on average")
    header = f"{'rule':10} {'true p':>7} {'rolled back':>12} {'passed':>8}"
    print(f"{header}  samples to roll back / to pass")
    for name, rule in (("sequential", sequential(gates)), ("previous", previous_rule(gates))):
        for p in (limit / 2, limit, 2 * limit):
            r = simulate(p, rule, args.rollouts, args.batch, args.max_samples, args.seed)
            print(
                f"{name:10} {p:>7.3f} {r['rolled_back']:>12.1%} {r['passed']:>8.1%}  "
                f"{r['n_fail']} / {r['n_pass']}"
            )


if __name__ == "__main__":
    main()
