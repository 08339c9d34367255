"""The ``hardware:`` the demo declares for each upstream: all its models share this machine's
CPU, so each string names the cores and the precision the model computes in. A build's
fingerprint includes it, so the same model version on two hardware pools is two builds."""

from __future__ import annotations

import os


def cpu(precision: str) -> str:
    """``CPU x2, int8 dynamic``: the machine's cores (shared by every demo model), precision."""
    return f"CPU x{os.cpu_count() or 1}, {precision}"
