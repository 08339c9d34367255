"""Triton model light_cand: light_ref bit for bit, except rows whose last feature is 13.0 diverge.

The shared code and the plant marker are documented in deploy/lib/shadowdemo/light.py.
"""

import os
import sys
from pathlib import Path

# The backend stub embeds the system's libpython and ignores the venv: the launcher passes the
# venv's site-packages in SHADOWPROXY_SITE_PACKAGES, and it must lead sys.path before anything
# imports numpy. deploy/lib holds the code the demo models share.
for _path in (
    str(Path(__file__).resolve().parents[3] / "lib"),
    os.environ.get("SHADOWPROXY_SITE_PACKAGES"),
):
    if _path:
        if _path in sys.path:
            sys.path.remove(_path)
        sys.path.insert(0, _path)

from shadowdemo.light import LightModel  # noqa: E402


class TritonPythonModel(LightModel):
    plant = True
