"""Triton model lm_bf16: the reference LM cast to bfloat16."""

import os
import sys
from pathlib import Path

# The backend stub embeds the system's libpython and ignores the venv: the launcher passes the
# venv's site-packages in SHADOWPROXY_SITE_PACKAGES, and it must lead sys.path before anything
# imports numpy or torch. deploy/lib holds the code the demo models share.
for _path in (
    str(Path(__file__).resolve().parents[3] / "lib"),
    os.environ.get("SHADOWPROXY_SITE_PACKAGES"),
):
    if _path:
        if _path in sys.path:
            sys.path.remove(_path)
        sys.path.insert(0, _path)

from shadowdemo.lm_serving import GenerateModel  # noqa: E402


class TritonPythonModel(GenerateModel):
    variant = "bf16"
