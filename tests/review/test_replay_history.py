"""Golden-set runs are history: ``replay --config`` records each run in the builds ledger under
the build that answered it, ``builds show`` lists the runs newest first, and ``--junit`` writes
JUnit XML that validates against the schema CI systems read (``tests/junit.xsd``)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http.aio as aioclient
import xmlschema
import yaml

from proxy.builds.ledger import BuildLedger
from proxy.cli import main
from proxy.review.golden import export_golden, golden_id
from proxy.review.junit import junit_xml, outcome
from tests.conftest import make_settings, repo_root

SCHEMA = xmlschema.XMLSchema(Path(__file__).resolve().parents[1] / "junit.xsd")
COMPARISONS = {"minilm_fp32": {"embedding": {"metric": "cosine", "min_cosine": 0.9999}}}
INT8 = ("--model-map", "minilm_fp32=minilm_int8")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=180,
    )


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    # Off the event loop: the proxy a test started runs on it.
    return await asyncio.to_thread(_cli, *args)


async def _golden_set(
    url: str, proxy_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> tuple[Path, Path, Any]:
    """Three int8 divergences caught by a real proxy in front of Triton, labelled regression,
    acceptable and (one) not at all, exported as the golden set; and a config on that Redis."""
    candidates = [{"name": "int8", "url": url, "model_map": {"minilm_fp32": "minilm_int8"}}]
    settings = make_settings(url, redis_url, candidates=candidates, comparisons=COMPARISONS)
    proxy = await proxy_factory(settings)
    client = aioclient.InferenceServerClient(f"127.0.0.1:{proxy.data_port}")
    try:
        for i, binary in enumerate([True, False, True]):
            text = aioclient.InferInput("text", [2], "BYTES")
            batch = [f"History sentence {i} on rates and rain.".encode(), b"A close match."]
            text.set_data_from_numpy(np.array(batch, dtype=np.object_), binary_data=binary)
            await client.infer("minilm_fp32", [text], headers={"X-Request-Id": f"h-{i}"})
    finally:
        await client.close()
    assert await proxy.drained(60)
    flagged = {s["request_id"]: s["id"] for s in await proxy.store.list_samples(flagged=True)}
    assert sorted(flagged) == ["h-0", "h-1", "h-2"]
    await proxy.store.label(flagged["h-0"], "regression", "int8 drift", "rita")
    await proxy.store.label(flagged["h-1"], "acceptable", "within tolerance", "rita")
    golden = tmp_path / "golden.jsonl"
    assert await export_golden(proxy.store, golden, settings.comparisons) == 3
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reference": {"name": "ref", "url": url},
                "buffer": {"redis_url": redis_url},
                "comparisons": COMPARISONS,
            }
        )
    )
    return golden, config, proxy


@pytest.mark.triton
async def test_each_replay_is_recorded_against_the_build_it_talked_to(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    url = triton_server.url
    golden, config, proxy = await _golden_set(url, proxy_factory, redis_url, tmp_path)
    first = await cli("replay", str(golden), "--url", url, *INT8, "--config", str(config), "--json")
    assert first.returncode == 0, first.stderr  # no --fail-on-regression: 0 as before
    report = json.loads(first.stdout)
    gid = report["golden"]["id"]
    assert report["golden"] == {"id": gid, "size": 3} and len(gid) == 12
    int8 = report["builds"]["minilm_fp32"]

    ledger = BuildLedger(proxy.store.redis, proxy.store.keys)
    build = await ledger.get(int8)
    assert build is not None and build["role"] == "candidate" and build["upstream"] == "replay"
    facts = build["facts"]
    assert facts["server"]["name"] == "triton"
    assert (facts["served"], facts["version"], facts["url"]) == ("minilm_int8", "1", url)
    assert facts["model_map"] == {"minilm_fp32": "minilm_int8"}
    [run] = await ledger.replays(int8)
    assert (run["golden_id"], run["golden_size"], run["build"]) == (gid, 3, int8)
    assert run["still_diverging"] == 1  # the regression: int8 drifts past min_cosine
    assert run["by_label"] == {
        "acceptable": {"still_diverges": 1},
        "regression": {"still_diverges": 1},
        "unlabelled": {"still_diverges": 1},
    }
    assert {(s["label"], s["diverges"]) for s in run["samples"]} == {
        ("regression", True),
        ("acceptable", True),
        ("unlabelled", True),
    }
    assert all("cosine" in s["reason"] and s["severity"] > 0 for s in run["samples"])

    shown = await cli("builds", "show", int8, "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert f"golden {gid} (3): 1 still diverge" in shown.stdout

    # A second run: history, newest first. This one against the reference model itself is
    # another build (what the server served differs), and there nothing diverges.
    second = await cli("replay", str(golden), "--url", url, *INT8, "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert f"recorded against build {int8}" in second.stdout and gid in second.stdout
    runs = await ledger.replays(int8)
    assert len(runs) == 2 and runs[0]["ts"] > runs[1]["ts"] == run["ts"]
    shown = await cli("builds", "show", int8, "--config", str(config))
    assert shown.stdout.count(f"golden {gid} (3)") == 2
    fp32 = await cli("replay", str(golden), "--url", url, "--config", str(config), "--json")
    ref_build = json.loads(fp32.stdout)["builds"]["minilm_fp32"]
    assert ref_build != int8
    [clean] = await ledger.replays(ref_build)
    assert clean["still_diverging"] == 0 and not any(s["diverges"] for s in clean["samples"])

    # Named as the proxy's own candidate (same upstream name, URL and model map), the run
    # joins the build the proxy recorded for it: one build, its live evidence and its runs.
    live = {b["upstream"]: b["id"] for b in await ledger.builds() if b["model"] == "minilm_fp32"}
    joined = await cli(
        "replay", str(golden), "--url", url, *INT8, "--upstream", "int8", "--config", str(config)
    )
    assert joined.returncode == 0, joined.stderr
    assert f"recorded against build {live['int8']}" in joined.stdout
    assert len(await ledger.replays(live["int8"])) == 1


def _counts(root: ET.Element) -> dict[str, dict[str, int]]:
    return {
        s.get("name", ""): {
            k: int(s.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")
        }
        for s in root.iter("testsuite")
    }


@pytest.mark.triton
async def test_junit_output_validates_and_counts_regressions(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    url = triton_server.url
    golden, _, _ = await _golden_set(url, proxy_factory, redis_url, tmp_path)
    out = tmp_path / "reports" / "junit.xml"
    out.parent.mkdir()
    done = await cli(
        "replay", str(golden), "--url", url, *INT8, "--junit", str(out), "--fail-on-regression"
    )
    assert done.returncode == 1, done.stderr
    SCHEMA.validate(str(out))
    root = ET.parse(out).getroot()
    # The regression that still diverges is the one failure; the acceptable one passes; the
    # unlabelled divergence is shown as skipped (nobody judged it yet).
    assert _counts(root) == {
        "golden.regression": {"tests": 1, "failures": 1, "errors": 0, "skipped": 0},
        "golden.acceptable": {"tests": 1, "failures": 0, "errors": 0, "skipped": 0},
        "golden.unlabelled": {"tests": 1, "failures": 0, "errors": 0, "skipped": 1},
    }
    [failure] = root.iter("failure")
    assert "cosine" in failure.get("message", "") and "severity" in failure.get("message", "")
    [case] = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert case.get("classname") == "minilm_int8.regression" and "(request h-0)" in case.get(
        "name", ""
    )
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    gid = golden_id([json.loads(line) for line in golden.read_text().splitlines()])
    assert props["golden_id"] == gid and props["golden_size"] == "3"
    assert root.get("tests") == "3" and root.get("failures") == "1"

    # Against the reference model nothing diverges: zero failures, exit 0 even when asked.
    done = await cli(
        "replay", str(golden), "--url", url, "--junit", str(out), "--fail-on-regression"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    SCHEMA.validate(str(out))
    counts = _counts(ET.parse(out).getroot())
    assert sum(c["failures"] + c["errors"] + c["skipped"] for c in counts.values()) == 0
    assert sum(c["tests"] for c in counts.values()) == 3


def _record(sample: str, label: str | None) -> dict[str, Any]:
    return {
        "id": sample,
        "request_id": f"req-{sample}",
        "model": "m",
        "candidate": "c",
        "label": label,
        "raw": {"request": base64.b64encode(b'{"inputs": []}').decode(), "reference_body": ""},
    }


def _result(sample: str, label: str | None, diverges: bool | None) -> dict[str, Any]:
    return {
        "record": _record(sample, label),
        "served": "m",
        "diverges": diverges,
        "reason": "no answer: refused" if diverges is None else "out: cosine 0.9\x07 < 0.99",
        "severity": 0.4 if diverges else 0.0,
        "latency_s": 0.01,
    }


def test_the_junit_rule_per_label_and_outcome() -> None:
    """Every cell of the rule, through the schema (no server needed)."""
    results = [
        _result("r1", "regression", True),
        _result("r2", "regression", False),
        _result("r3", "regression", None),
        _result("a1", "acceptable", True),
        _result("n1", "needs-look", True),
        _result("n2", "needs-look", False),
        _result("u1", None, True),
    ]
    assert [outcome(r) for r in results] == [
        "failure",
        "passed",
        "error",
        "passed",
        "skipped",
        "passed",
        "skipped",
    ]
    tree = junit_xml(
        results,
        url="http://127.0.0.1:1",
        golden="abc",
        golden_size=7,
        builds={"m": "0123456789ab"},
        started=0.0,
        duration_s=1.5,
        hostname="ci",
    )
    root = tree.getroot()
    SCHEMA.validate(root)  # the bell character in a reason is dropped, not written
    assert _counts(root) == {
        "golden.regression": {"tests": 3, "failures": 1, "errors": 1, "skipped": 0},
        "golden.acceptable": {"tests": 1, "failures": 0, "errors": 0, "skipped": 0},
        "golden.needs-look": {"tests": 2, "failures": 0, "errors": 0, "skipped": 1},
        "golden.unlabelled": {"tests": 1, "failures": 0, "errors": 0, "skipped": 1},
    }
    suite = next(root.iter("testsuite"))
    assert (suite.get("timestamp"), suite.get("hostname")) == ("1970-01-01T00:00:00", "ci")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["build.m"] == "0123456789ab"


def test_the_golden_id_is_its_samples_and_labels() -> None:
    a, b = _record("s1", "regression"), _record("s2", None)
    assert golden_id([a, b]) == golden_id([b, a])  # the file's order does not matter
    assert golden_id([a, b]) != golden_id([a, {**b, "label": "acceptable"}])
    assert golden_id([a, b]) != golden_id([a])


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            ("--junit", "/nonexistent-dir/j.xml"),
            "--junit /nonexistent-dir/j.xml: no such directory",
        ),
        (("--junit", "/"), "--junit /: is a directory"),
        (("--hardware", "L4 x1"), "--hardware and --metrics-url describe the build"),
        (("--config", "/nonexistent.yaml"), "/nonexistent.yaml"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], says: str
) -> None:
    golden = tmp_path / "g.jsonl"
    golden.write_text(json.dumps(_record("s1", "regression")) + "\n")
    # Port 9 (discard) on loopback: nothing would answer, but nothing is sent either.
    assert main(["replay", str(golden), "--url", "http://127.0.0.1:9", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "replaying [" not in err


def test_an_unanswered_regression_fails_the_gate_and_is_a_junit_error(tmp_path: Path) -> None:
    golden, out = tmp_path / "g.jsonl", tmp_path / "j.xml"
    golden.write_text(
        "".join(json.dumps(_record(s, label)) + "\n" for s, label in [("s1", "regression")])
    )
    args = ["replay", str(golden), "--url", "http://127.0.0.1:9", "--junit", str(out)]
    assert main(args) == 0  # the report is written; no gate asked for
    SCHEMA.validate(str(out))
    assert _counts(ET.parse(out).getroot())["golden.regression"]["errors"] == 1
    # Not shown gone: with the gate, a server that did not answer does not pass the build.
    assert main([*args, "--fail-on-regression"]) == 1
