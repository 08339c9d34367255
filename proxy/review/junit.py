"""A golden-set replay as JUnit XML, so a CI system shows a model build's regressions like
failing tests.

The layout is the one Jenkins, GitLab, GitHub Actions and Ant's JUnit report read: a
``<testsuites>`` root, one ``<testsuite>`` per label (``regression``, ``acceptable``,
``needs-look``, ``unlabelled``) with ``tests``, ``failures``, ``errors``, ``skipped``, ``time``,
``timestamp`` (UTC, no zone: the form the Ant schema demands) and ``hostname``, a
``<properties>`` block naming the golden set, the URL and the build(s), and one ``<testcase>``
per golden sample (``classname`` = served model and label, ``name`` = sample id and request id,
``time`` = the replayed request's seconds).

The rule, per sample:

- the server gave no answer (refused, reset, timed out): ``<error>``, whatever the label;
- labelled ``regression`` and still diverging: ``<failure>`` (message: the reason and the
  severity). Exactly the samples for which ``--fail-on-regression`` exits 1;
- labelled ``needs-look`` or unlabelled and diverging: ``<skipped>``, with the reason: nobody
  has judged that divergence yet, so it is shown, not failed;
- labelled ``acceptable``: passes whether or not it still diverges (its divergence was judged
  harmless);
- anything that now matches the recorded reference: passes.

Built with ``xml.etree.ElementTree``: every attribute and text is escaped by the library, and
characters XML 1.0 cannot carry at all are dropped first.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Suites in this order; any other label (a newer verdict) follows, sorted.
_LABEL_ORDER = ("regression", "acceptable", "needs-look", "unlabelled")
# XML 1.0 forbids these code points even escaped; a server's error text may carry them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _NOT_XML.sub("", str(text))


def outcome(result: Mapping[str, Any]) -> str:
    """``passed``, ``failure``, ``skipped`` or ``error`` for one replayed sample (the rule in the
    module docstring)."""
    label = result["record"].get("label") or "unlabelled"
    if result["diverges"] is None:
        return "error"
    if not result["diverges"] or label == "acceptable":
        return "passed"
    return "failure" if label == "regression" else "skipped"


def _seconds(s: float) -> str:
    return f"{max(s, 0.0):.3f}"


def _testcase(suite: ET.Element, res: Mapping[str, Any]) -> str:
    rec = res["record"]
    label = rec.get("label") or "unlabelled"
    case = ET.SubElement(
        suite,
        "testcase",
        name=_clean(f"{rec['id']} (request {rec.get('request_id') or '-'})"),
        classname=_clean(f"{res.get('served') or rec['model']}.{label}"),
        time=_seconds(float(res.get("latency_s") or 0.0)),
    )
    kind = outcome(res)
    severity = float(res.get("severity") or 0.0)
    if kind == "error":
        node = ET.SubElement(case, "error", message=_clean(res["reason"]), type="no-answer")
        node.text = _clean(res["reason"])
    elif kind == "failure":
        node = ET.SubElement(
            case,
            "failure",
            message=_clean(f"{res['reason']} (severity {severity:.4g})"),
            type="regression-still-diverges",
        )
        node.text = _clean(
            f"labelled regression ({rec.get('note') or 'no note'}); still diverges:\n"
            f"{res['reason']}\nseverity {severity:.4g}"
        )
    elif kind == "skipped":
        # Text only: the Jenkins schema types <skipped> as a plain string, no attributes.
        node = ET.SubElement(case, "skipped")
        node.text = _clean(f"diverges, not judged yet ({label}): {res['reason']}")
    return kind


def junit_xml(
    results: list[dict[str, Any]],
    *,
    url: str,
    golden: str,
    golden_size: int,
    builds: Mapping[str, str],
    started: float,
    duration_s: float,
    hostname: str | None = None,
) -> ET.ElementTree[ET.Element]:
    """The replay's results as a JUnit XML tree (one suite per label)."""
    host = hostname or socket.gethostname() or "localhost"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started))
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for res in results:
        by_label[res["record"].get("label") or "unlabelled"].append(res)
    order = [x for x in _LABEL_ORDER if x in by_label]
    order += sorted(set(by_label) - set(_LABEL_ORDER))
    root = ET.Element("testsuites", name="shadowproxy replay", time=_seconds(duration_s))
    totals: dict[str, int] = defaultdict(int)
    for n, label in enumerate(order):
        cases = sorted(by_label[label], key=lambda r: str(r["record"]["id"]))
        suite = ET.SubElement(root, "testsuite", name=f"golden.{label}")
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("golden_id", golden),
            ("golden_size", str(golden_size)),
            ("url", url),
            ("label", label),
            *((f"build.{model}", bid) for model, bid in sorted(builds.items())),
        ):
            ET.SubElement(props, "property", name=key, value=_clean(value))
        kinds = [_testcase(suite, res) for res in cases]
        counts = {k: kinds.count(k) for k in ("failure", "error", "skipped")}
        suite.attrib.update(
            {
                "tests": str(len(cases)),
                "failures": str(counts["failure"]),
                "errors": str(counts["error"]),
                "skipped": str(counts["skipped"]),
                "time": _seconds(sum(float(r.get("latency_s") or 0.0) for r in cases)),
                "timestamp": stamp,
                "hostname": _clean(host),
                "id": str(n),
                "package": "shadowproxy.golden",
            }
        )
        ET.SubElement(suite, "system-out").text = _clean(
            f"{len(cases)} {label} samples replayed against {url}: "
            f"{sum(bool(r['diverges']) for r in cases)} still diverge"
        )
        ET.SubElement(suite, "system-err")
        totals["tests"] += len(cases)
        totals["failures"] += counts["failure"]
        totals["errors"] += counts["error"]
    for key in ("tests", "failures", "errors"):
        root.set(key, str(totals[key]))
    ET.indent(root)
    return ET.ElementTree(root)


def check_writable(path: Path) -> None:
    """Fail before a replay, not after it, when ``--junit`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"--junit {path}: is a directory")
    if not parent.is_dir():
        raise ConfigError(f"--junit {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--junit {path}: not writable")


def write_junit(path: Path, tree: ET.ElementTree[ET.Element]) -> None:
    """Write whole or not at all: a CI step never reads half a report."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                tree.write(fh, encoding="utf-8", xml_declaration=True)
            os.chmod(tmp, 0o644)  # a report for CI to read, unlike mkstemp's 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"--junit {path}: cannot write ({exc.strerror or exc})") from None
