"""The ``shadowproxy`` command line: serve, worker, demo, replay, canary, check-config, review
list/show/label/export/delete."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from .buffer.embedded import EmbeddedRedis, running_url
from .buffer.store import LABELS, SampleStore
from .builds import commands as builds_commands
from .canary import commands as canary_commands
from .errors import ConfigError, ShadowProxyError, StoreError
from .review.admin import render_payloads
from .review.golden import (
    export_golden,
    load_golden,
    print_replay_report,
    replay_golden,
    replay_report,
)
from .settings import Settings, load_settings

DEMO_REQUESTS = 300
LLM_DEMO_REQUESTS = 24


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, type=Path, metavar="FILE")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run N proxy processes on the same ports (SO_REUSEPORT), sharing one Redis",
    )

    demo = sub.add_parser("demo", help="run the whole demo on embedded defaults and report")
    demo.add_argument(
        "--requests",
        type=int,
        default=DEMO_REQUESTS,
        help=f"live requests to send ({DEMO_REQUESTS}; with --llm, {LLM_DEMO_REQUESTS})",
    )
    demo.add_argument("--state-dir", type=Path, default=Path(".state/demo"))
    demo.add_argument("--keep-running", action="store_true", help="stay up for review")
    demo.add_argument(
        "--canary",
        action="store_true",
        help="instead, run two canary rollouts (traced promotes, int8 rolls back) and print "
        "the decision log",
    )
    demo.add_argument(
        "--llm",
        action="store_true",
        help="instead, stream chat completions through a proxy in front of real vLLM servers "
        "(fp32 reference, bf16 candidate, fp32 twin); needs `make vllm` once",
    )

    replay = sub.add_parser("replay", help="re-send a golden set to a model and report")
    replay.add_argument("file", type=Path, help="JSON lines from `review export`")
    replay.add_argument("--url", required=True, help="base URL of the V2 server to test")
    replay.add_argument(
        "--model-map",
        action="append",
        default=[],
        metavar="REF=NEW",
        help="send requests for model REF to NEW (repeatable)",
    )
    replay.add_argument("--candidate", help="only samples that this candidate produced")
    replay.add_argument("--label", help="only samples with this label (or 'unlabelled')")
    replay.add_argument("--json", action="store_true")
    replay.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when a sample labelled regression still diverges, or got no answer "
        "(with or without --junit and --config)",
    )
    replay.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="record the run in the builds ledger of this config's Redis, against the build "
        "the server at --url serves (one per model replayed); `builds show ID` lists it. "
        "Without --config nothing is recorded",
    )
    replay.add_argument(
        "--upstream",
        default="replay",
        metavar="NAME",
        help="the upstream name the build is recorded under (default: replay); a candidate's "
        "own name, with its URL, model map and --hardware, records the run against that "
        "candidate's build",
    )
    replay.add_argument(
        "--hardware", metavar="TEXT", help="with --config: the server's hardware, e.g. 'L4 x1'"
    )
    replay.add_argument(
        "--metrics-url", metavar="URL", help="with --config: the server's Prometheus metrics"
    )
    replay.add_argument(
        "--junit",
        type=Path,
        metavar="FILE",
        help="also write JUnit XML, one suite per label: a regression that still diverges is "
        "a <failure>; a needs-look or unlabelled sample that diverges is <skipped>; an "
        "acceptable sample passes either way; no answer from the server is an <error>",
    )

    canary_commands.add_parser(sub)
    builds_commands.add_parser(sub)

    check = sub.add_parser(
        "check-config", help="validate a config file; exit 1 with the error when it is wrong"
    )
    check.add_argument("file", type=Path, metavar="FILE")

    worker = sub.add_parser(
        "worker",
        help="compare copies from the Redis stream (proxy.compare: redis): call the candidates, "
        "compare, store",
    )
    worker.add_argument("--config", required=True, type=Path, metavar="FILE")

    review = sub.add_parser("review", help="read and label stored samples")
    rsub = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    lst = rsub.add_parser("list", help="list samples, newest first")
    lst.add_argument("--flagged", action="store_true", help="only flagged samples")
    lst.add_argument("--candidate", help="only this candidate")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true", help="JSON for scripts")
    show = rsub.add_parser("show", help="one sample, with both answers")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    label = rsub.add_parser("label", help="judge a sample")
    label.add_argument("id")
    label.add_argument("--verdict", required=True, choices=LABELS)
    label.add_argument("--note", default="")
    export = rsub.add_parser("export", help="write the golden set as JSON lines")
    export.add_argument("--out", required=True, type=Path, metavar="FILE")
    delete = rsub.add_parser("delete", help="remove a sample, its payloads and its label")
    delete.add_argument("id")
    for p in (lst, show, label, export, delete):
        p.add_argument("--config", required=True, type=Path, metavar="FILE")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            from .serve import install_event_loop_policy, serve, serve_workers

            settings = load_settings(args.config)
            logging.getLogger().setLevel(settings.log_level)
            install_event_loop_policy()
            if args.workers > 1:
                return serve_workers(settings, args.workers, config_path=args.config)
            asyncio.run(serve(settings, config_path=args.config))
            return 0
        if args.command == "demo" and args.llm:
            from .demo.vllm_demo import run_vllm_demo

            requests = args.requests if args.requests != DEMO_REQUESTS else LLM_DEMO_REQUESTS
            return asyncio.run(run_vllm_demo(requests, args.state_dir / "llm"))
        if args.command == "demo" and args.canary:
            from .demo.canary import run_canary_demo

            return asyncio.run(run_canary_demo(args.state_dir / "canary"))
        if args.command == "demo":
            from .demo.runner import run_demo

            return asyncio.run(run_demo(args.requests, args.state_dir, args.keep_running))
        if args.command == "replay":
            return asyncio.run(_replay(args))
        if args.command == "check-config":
            from .check_config import check_config

            return check_config(args.file)
        if args.command == "worker":
            from .shadow.stream_worker import run_worker

            settings = load_settings(args.config)
            logging.getLogger().setLevel(settings.log_level)
            return asyncio.run(run_worker(settings))
        if args.command == "canary":
            return asyncio.run(_canary(args, load_settings(args.config)))
        if args.command == "builds":
            return asyncio.run(_builds(args, load_settings(args.config)))
        return asyncio.run(_review(args, load_settings(args.config)))
    except ShadowProxyError as exc:
        print(f"shadowproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[SampleStore]:
    """The proxy's store: its Redis URL, the running embedded Redis, or one started on its data."""
    embedded: EmbeddedRedis | None = None
    if settings.buffer.redis_url is not None:
        url = settings.buffer.redis_url.get_secret_value()
    else:
        found = running_url(settings.buffer.state_dir)
        if found is None:
            embedded = EmbeddedRedis(settings.buffer.state_dir)
            await asyncio.to_thread(embedded.start)
            found = embedded.url
        url = found
    store = SampleStore.from_url(url, settings.buffer, spool=False)  # it only reads and labels
    try:
        if not await store.ping():
            raise StoreError(f"cannot reach the sample store at {url.split('@')[-1]}")
        yield store
    finally:
        await store.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def _row(s: dict[str, Any]) -> list[str]:
    label = (s.get("label") or {}).get("verdict", "")
    when = time.strftime("%H:%M:%S", time.localtime(float(s["ts"])))
    reason = s.get("reason") or ""
    return [
        s["id"][:12],
        when,
        s["candidate"],
        s["model"],
        f"{float(s['severity']):.3g}",
        "yes" if s.get("flagged") else "",
        label,
        str(s.get("request_id", ""))[:24],
        reason[:60] + ("..." if len(reason) > 60 else ""),
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


async def _canary(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store(settings) as store:
        return await canary_commands.run(args, settings, store)


async def _builds(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store(settings) as store:
        return await builds_commands.run(args, settings, store)


async def _review(args: argparse.Namespace, settings: Settings) -> int:
    async with open_store(settings) as store:
        if args.review_command == "list":
            items = await store.list_samples(
                flagged=args.flagged, candidate=args.candidate, limit=args.limit
            )
            if args.json:
                for item in items:
                    item.pop("previews", None)
                print(json.dumps(items, indent=2))
            else:
                header = [
                    "id",
                    "time",
                    "candidate",
                    "model",
                    "severity",
                    "flagged",
                    "label",
                    "request id",
                    "reason",
                ]
                print_table(header, [_row(s) for s in items])
            return 0
        if args.review_command == "show":
            sample = await _find(store, args.id)
            sample["payloads"] = render_payloads(sample["payloads"], sample.get("truncated"))
            if args.json:
                print(json.dumps(sample, indent=2))
            else:
                _print_sample(sample)
            return 0
        if args.review_command == "label":
            sample = await _find(store, args.id)
            label = await store.label(sample["id"], args.verdict, args.note, "cli")
            print(f"{sample['id']}: {label['verdict']}" + (f" ({args.note})" if args.note else ""))
            return 0
        if args.review_command == "delete":
            sample = await _find(store, args.id)
            await store.delete(sample["id"])
            print(f"{sample['id']}: deleted")
            return 0
        await export_golden(store, args.out, settings.comparisons)  # created 0600
        return 0


async def _find(store: SampleStore, prefix: str) -> dict[str, Any]:
    """A sample by id, or by a unique prefix of a flagged sample's id (as the table shows it)."""
    sample = await store.get_sample(prefix)
    if sample is not None:
        return sample
    matches = [
        s["id"]
        for s in await store.list_samples(flagged=True, limit=100_000)
        if s["id"].startswith(prefix)
    ]
    if len(matches) == 1:
        found = await store.get_sample(matches[0])
        if found is not None:
            return found
    what = "is ambiguous" if len(matches) > 1 else "matches no stored sample (unknown or expired)"
    raise StoreError(f"sample id {prefix!r} {what}")


def _print_sample(s: dict[str, Any]) -> None:
    ref, cand = s["reference"], s["candidate_side"]
    print(f"sample {s['id']}  request {s['request_id']}  flagged: {s['flagged']}")
    print(f"  reason: {s['reason'] or '-'}")
    for side, d in (("reference", ref), ("candidate", cand)):
        print(
            f"  {side:9} {d['upstream']}: model {d['model']} v{d['version']}, "
            f"status {d['status']}, {d['latency_ms']:.1f} ms"
        )
    for out in s["outputs"]:
        scores = ", ".join(f"{k}={v:.4g}" for k, v in out["scores"].items())
        mark = "FLAGGED " if out["flagged"] else ""
        print(f"  output {out['output']} [{out['metric']}] {mark}{scores}")
    for name, pv in (s.get("previews") or {}).items():
        for side in ("reference", "candidate"):
            if pv.get(side):
                print(f"    {name} {side}: {pv[side]['shape']} {pv[side]['head'][:6]}")
    if s.get("label"):
        print(f"  label: {s['label']['verdict']} by {s['label']['by']}: {s['label']['note']}")


def _parse_map(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        ref, sep, new = pair.partition("=")
        if not sep or not ref or not new:
            raise ConfigError(f"--model-map expects REF=NEW, got {pair!r}")
        out[ref] = new
    return out


async def _replay(args: argparse.Namespace) -> int:
    from .review.golden import golden_id, record_replay
    from .review.junit import check_writable, junit_xml, write_junit

    records = load_golden(args.file)
    if args.candidate:
        records = [r for r in records if r["candidate"] == args.candidate]
    if args.label:
        records = [r for r in records if (r.get("label") or "unlabelled") == args.label]
    model_map = _parse_map(args.model_map)
    url = args.url.rstrip("/")
    # Everything that can be wrong is found before the replay, not after it.
    settings = load_settings(args.config) if args.config else None
    if settings is None and (args.hardware or args.metrics_url):
        raise ConfigError("--hardware and --metrics-url describe the build: they need --config")
    if args.junit:
        check_writable(args.junit)
    golden, started = golden_id(records), time.time()
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(settings)) if settings else None
        results = await replay_golden(records, url, model_map=model_map)
        report = replay_report(results)
        report["golden"] = {"id": golden, "size": len(records)}
        if store is not None:
            report["builds"] = await record_replay(
                store,
                results,
                url=url,
                upstream=args.upstream,
                hardware=args.hardware,
                metrics_url=args.metrics_url,
                model_map=model_map,
                golden=golden,
                golden_size=len(records),
                ts=started,
            )
    if args.junit:
        tree = junit_xml(
            results,
            url=url,
            golden=golden,
            golden_size=len(records),
            builds=report.get("builds", {}),
            started=started,
            duration_s=time.time() - started,
        )
        write_junit(args.junit, tree)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_replay_report(report)
    # A regression the server did not answer for is not shown gone: a gate that passed while
    # the server was down would wave the build through.
    regression = report["by_label"].get("regression", {})
    unsure = regression.get("still_diverges", 0) + regression.get("no_answer", 0)
    return 1 if args.fail_on_regression and unsure else 0
