"""`flonnx loadtest [URL]`: keep N requests in flight against a flonnx server on this machine.

Bounded in count (--requests) and time (--duration). Reports requests/s, images/s, latency
percentiles of the answered requests, statuses, and the server's RSS over the run (from its
/metrics). Faults, mixed into the load (--faults, one request in --fault-every): `disconnect`
(the client gives up mid-request), `oversized` (a body past the server's upload limit: 413),
`malformed` (bytes that are not an image: 400), `pixels` (a PNG header with too many pixels: 413).
`--flood` ends with a burst larger than the server's queue: some requests must get 503 with
Retry-After, none may fail otherwise. `--baseline FOLDER` first times `Florence2.run_batch`
in this process on the same images, for the server-against-in-process ratio.

Only loopback URLs: this is a tool for measuring your own server, not anybody else's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import statistics
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from flonnx.runtime.errors import InputError

from .settings import LOOPBACK_HOSTS

FAULTS = ("disconnect", "oversized", "malformed", "pixels")
EXPECTED = {"oversized": {"413"}, "malformed": {"400"}, "pixels": {"413"}, "disconnect": {"gone", "200"}}


@dataclass(frozen=True)
class LoadPlan:
    url: str = "http://127.0.0.1:8000"
    concurrency: int = 8
    requests: int = 100
    duration_s: float = 300.0
    warmup: int = 0  # requests sent first and left out of the numbers (e.g. one batch)
    tasks: tuple[str, ...] = ("<OD>",)
    text: str | None = None
    options: dict = field(default_factory=dict)  # max_new_tokens, num_beams, ...
    faults: tuple[str, ...] = ()
    fault_every: int = 10
    disconnect_after_s: float = 0.05
    flood: bool = False
    distinct: int = 64  # base images; every request's bytes are made unique unless repeat
    repeat_images: bool = False  # send identical bytes (feature-cache hits)
    images: tuple[str, ...] = ()  # files to send instead of synthetic scenes
    rss_interval_s: float = 1.0

    def __post_init__(self):
        host = urlparse(self.url).hostname
        if host not in LOOPBACK_HOSTS:
            raise InputError(
                f"loadtest only targets this machine ({', '.join(LOOPBACK_HOSTS)}), got {self.url!r}"
            )
        for name in ("concurrency", "requests", "fault_every", "distinct"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.duration_s <= 0:
            raise InputError(f"duration must be positive, got {self.duration_s}")
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise InputError(f"unknown fault {', '.join(unknown)}, expected: {', '.join(FAULTS)}")


# -- images -----------------------------------------------------------------------------------------


def make_images(plan: LoadPlan, count: int) -> list[bytes]:
    """`count` PNGs: synthetic scenes (or the given files), each stamped in its first pixels with
    its index and a salt drawn for this run, so that no two requests, not even of two runs against
    one server, send the same bytes (unless repeat_images) and hit the server's feature cache."""
    from PIL import Image

    if plan.images:
        bases = [Image.open(path).convert("RGB") for path in plan.images]
    else:
        from flonnx.runtime import synthetic

        bases = [synthetic.make_scene(1234, i).image.convert("RGB") for i in range(min(plan.distinct, count))]
    salt = os.urandom(3)
    out = []
    for index in range(count):
        image = bases[index % len(bases)]
        if not plan.repeat_images:
            image = image.copy()
            for k, byte in enumerate(salt + index.to_bytes(3, "big")):
                image.putpixel((k, 0), (byte, byte, byte))
        out.append(_png(image))
    return out


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost nothing: a header-only bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# -- the run ----------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (enough for the few series read here)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


class LoadTest:
    def __init__(self, plan: LoadPlan):
        import httpx

        self.plan = plan
        self.httpx = httpx
        self.latencies: list[float] = []
        self.timings: list[dict] = []  # the server's, per answered request
        self.statuses: dict[str, int] = {}
        self.faults: dict[str, dict[str, int]] = {kind: {} for kind in plan.faults}
        self.rss: list[float] = []
        self._next = 0

    async def run(self) -> dict:
        plan = self.plan
        timeout = self.httpx.Timeout(None, connect=10.0)
        limits = self.httpx.Limits(
            max_connections=plan.concurrency + 8, max_keepalive_connections=plan.concurrency
        )
        async with self.httpx.AsyncClient(base_url=plan.url, timeout=timeout, limits=limits) as client:
            self.client = client
            info = (await client.get("/v1/info")).raise_for_status().json()
            self.limits = info["limits"]
            total = plan.warmup + plan.requests
            self.images = await asyncio.to_thread(
                make_images, plan, total + (self._flood_size() if plan.flood else 0)
            )
            if plan.warmup:
                await self._phase(range(plan.warmup), record=False)
            before = await self._metrics()
            self.rss = [before.get("process_resident_memory_bytes", float("nan"))]
            sampler = asyncio.create_task(self._sample_rss())
            started = time.perf_counter()
            await self._phase(range(plan.warmup, total), record=True, until=started + plan.duration_s)
            elapsed = time.perf_counter() - started
            sampler.cancel()
            after = await self._metrics()
            self.rss.append(after.get("process_resident_memory_bytes", float("nan")))
            flood = await self._flood(total) if plan.flood else None
        return self._report(elapsed, before, after, flood, info)

    async def _phase(self, indices: range, record: bool, until: float = math.inf) -> None:
        queue = iter(indices)

        async def worker() -> None:
            for index in queue:
                if time.perf_counter() > until:
                    return
                kind = self._fault_of(index) if record else None
                if kind is None:
                    await self._request(index, record)
                else:
                    await self._fault(kind, index)

        await asyncio.gather(*(worker() for _ in range(self.plan.concurrency)))

    def _fault_of(self, index: int) -> str | None:
        plan = self.plan
        if not plan.faults or (index + 1) % plan.fault_every:
            return None
        return plan.faults[(index // plan.fault_every) % len(plan.faults)]

    def _form(self, image: bytes) -> tuple[dict, dict]:
        data = {"task": list(self.plan.tasks), **{k: str(v) for k, v in self.plan.options.items()}}
        if self.plan.text is not None:
            data["text"] = self.plan.text
        return data, {"image": ("image.png", image, "image/png")}

    async def _post(self, image: bytes):
        data, files = self._form(image)
        return await self.client.post("/v1/run", data=data, files=files)

    async def _request(self, index: int, record: bool) -> None:
        started = time.perf_counter()
        try:
            response = await self._post(self.images[index])
            status = str(response.status_code)
        except self.httpx.HTTPError as error:
            status = type(error).__name__
        if record:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == "200":
                self.latencies.append(time.perf_counter() - started)
                self.timings.append(response.json().get("timings", {}))

    async def _fault(self, kind: str, index: int) -> None:
        image = self.images[index]
        if kind == "oversized":
            image = b"\0" * (self.limits["max_upload_bytes"] + 1024)
        elif kind == "malformed":
            image = b"this is not an image " * 64
        elif kind == "pixels":
            side = math.isqrt(self.limits["max_pixels"]) + 1
            image = png_header(side, side)
        try:
            if kind == "disconnect":
                response = await asyncio.wait_for(self._post(image), self.plan.disconnect_after_s)
            else:
                response = await self._post(image)
            outcome = str(response.status_code)
        except asyncio.TimeoutError:
            outcome = "gone"  # we hung up; the server should drop the request
        except self.httpx.HTTPError as error:
            outcome = type(error).__name__
        counts = self.faults[kind]
        counts[outcome] = counts.get(outcome, 0) + 1

    def _flood_size(self) -> int:
        return 2 * (self.limits["queue_size"] + self.limits["max_batch"])

    async def _flood(self, first: int) -> dict:
        """More requests at once than the queue holds: the overflow must get 503 + Retry-After."""
        count = self._flood_size()
        limits = self.httpx.Limits(max_connections=count)
        async with self.httpx.AsyncClient(base_url=self.plan.url, timeout=None, limits=limits) as client:
            data, _ = self._form(b"")
            posts = (
                client.post(
                    "/v1/run", data=data, files={"image": ("image.png", self.images[first + i], "image/png")}
                )
                for i in range(count)
            )
            results = await asyncio.gather(*posts, return_exceptions=True)
        statuses: dict[str, int] = {}
        retry_after = 0
        for result in results:
            status = type(result).__name__ if isinstance(result, BaseException) else str(result.status_code)
            statuses[status] = statuses.get(status, 0) + 1
            if status == "503" and result.headers.get("retry-after", "").isdigit():
                retry_after += 1
        return {"sent": count, "status": statuses, "503_with_retry_after": retry_after}

    async def _metrics(self) -> dict[str, float]:
        try:
            return parse_metrics((await self.client.get("/metrics")).text)
        except self.httpx.HTTPError:
            return {}

    async def _sample_rss(self) -> None:
        while True:
            await asyncio.sleep(self.plan.rss_interval_s)
            rss = (await self._metrics()).get("process_resident_memory_bytes")
            if rss is not None:
                self.rss.append(rss)

    def _report(self, elapsed: float, before: dict, after: dict, flood: dict | None, info: dict) -> dict:
        ok = self.statuses.get("200", 0)
        batches = after.get("flonnx_batch_size_count", 0) - before.get("flonnx_batch_size_count", 0)
        rows = after.get("flonnx_batch_size_sum", 0) - before.get("flonnx_batch_size_sum", 0)
        busy = after.get("flonnx_batch_seconds_sum", 0) - before.get("flonnx_batch_seconds_sum", 0)
        rss = [r for r in self.rss if not math.isnan(r)]
        unexpected = {
            kind: sum(n for outcome, n in counts.items() if outcome not in EXPECTED[kind])
            for kind, counts in self.faults.items()
        }
        return {
            "plan": {**asdict(self.plan), "tasks": list(self.plan.tasks)},
            "model": info.get("model"),
            "variant": info.get("variant"),
            "duration_s": round(elapsed, 3),
            "answered": ok,
            "requests_per_s": round(ok / elapsed, 4) if elapsed else None,
            "images_per_s": round(ok / elapsed, 4) if elapsed else None,  # one image per request
            "latency_s": {
                "p50": _percentile(self.latencies, 0.50),
                "p90": _percentile(self.latencies, 0.90),
                "p99": _percentile(self.latencies, 0.99),
                "max": max(self.latencies, default=None),
                "mean": statistics.fmean(self.latencies) if self.latencies else None,
            },
            "latencies_s": [round(v, 4) for v in self.latencies],
            "server_timings": self.timings,
            "status": dict(sorted(self.statuses.items())),
            "errors": sum(n for status, n in self.statuses.items() if status != "200"),
            "faults": {
                kind: {"outcomes": counts, "unexpected": unexpected[kind]}
                for kind, counts in self.faults.items()
            },
            "flood": flood,
            "server": {
                "batches": batches,
                "mean_batch_size": round(rows / batches, 3) if batches else None,
                # the share of the run the worker spent in batches; the rest is HTTP, queueing, idle
                "busy_fraction": round(busy / elapsed, 4) if elapsed else None,
                "rss_start_mb": round(rss[0] / 2**20, 1) if rss else None,
                "rss_end_mb": round(rss[-1] / 2**20, 1) if rss else None,
                "rss_peak_mb": round(max(rss) / 2**20, 1) if rss else None,
                "rss_growth": round(rss[-1] / rss[0] - 1, 4) if len(rss) > 1 else None,
                "rss_samples_mb": [round(r / 2**20, 1) for r in rss],
                "status_499": after.get('flonnx_requests_total{status="499"}', 0)
                - before.get('flonnx_requests_total{status="499"}', 0),
            },
        }


def run_load(plan: LoadPlan) -> dict:
    return asyncio.run(LoadTest(plan).run())


def failed(report: dict) -> list[str]:
    """What went wrong, as sentences; empty when the run is clean."""
    problems = []
    if report["errors"]:
        problems.append(f"{report['errors']} requests failed: {report['status']}")
    for kind, fault in report["faults"].items():
        if fault["unexpected"]:
            problems.append(f"fault {kind}: unexpected outcomes {fault['outcomes']}")
    flood = report.get("flood")
    if flood:
        bad = {s: n for s, n in flood["status"].items() if s not in ("200", "503")}
        if bad or not flood["status"].get("503"):
            problems.append(f"flood: expected 200s and 503s, got {flood['status']}")
        elif flood["503_with_retry_after"] != flood["status"]["503"]:
            problems.append("flood: a 503 came without Retry-After")
    return problems


# -- command line -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoadPlan()
    parser.add_argument("url", nargs="?", default=d.url, help=f"the server (default {d.url}; loopback only)")
    parser.add_argument("-c", "--concurrency", type=int, default=d.concurrency, help="requests in flight")
    parser.add_argument(
        "-n", "--requests", type=int, default=d.requests, help=f"how many (default {d.requests})"
    )
    parser.add_argument("--duration", type=float, default=d.duration_s, help="stop sending after this many s")
    parser.add_argument("--warmup", type=int, default=0, help="requests first, left out of the numbers")
    parser.add_argument("--task", action="append", help='task per request, repeatable (default "<OD>")')
    parser.add_argument("--text", help="input text for tasks that take text")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--min-new-tokens", type=int, help="force lengths (random-weight models)")
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--image", action="append", help="send these files (default: synthetic scenes)")
    parser.add_argument("--repeat-images", action="store_true", help="identical bytes: feature-cache hits")
    parser.add_argument("--faults", help=f"comma-separated: {','.join(FAULTS)}")
    parser.add_argument(
        "--fault-every", type=int, default=d.fault_every, help="one fault per this many requests"
    )
    parser.add_argument("--flood", action="store_true", help="end with a burst past the queue (expects 503s)")
    parser.add_argument("--baseline", metavar="FOLDER", help="first time run_batch in-process on FOLDER")
    parser.add_argument("--variant", help="variant for --baseline")
    parser.add_argument("--threads", type=int, help="threads for --baseline (match the server's)")
    parser.add_argument("--baseline-batch", type=int, default=8)
    parser.add_argument("--baseline-repeats", type=int, default=2)
    parser.add_argument("--json", metavar="OUT", help="write the full report here")


def plan_from(args: argparse.Namespace) -> LoadPlan:
    options = {
        name: getattr(args, name)
        for name in ("max_new_tokens", "min_new_tokens", "num_beams")
        if getattr(args, name) is not None
    }
    return LoadPlan(
        url=args.url,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        warmup=args.warmup,
        tasks=tuple(args.task or ("<OD>",)),
        text=args.text,
        options=options,
        faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()) if args.faults else (),
        fault_every=args.fault_every,
        flood=args.flood,
        images=tuple(args.image or ()),
        repeat_images=args.repeat_images,
    )


def summary(report: dict) -> str:
    lat = report["latency_s"]
    server = report["server"]

    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f} ms"

    lines = [
        f"{report['answered']} answered in {report['duration_s']:.1f} s: "
        f"{report['requests_per_s']:.3f} req/s, "
        f"latency p50 {ms(lat['p50'])}, p90 {ms(lat['p90'])}, p99 {ms(lat['p99'])}",
        f"status {report['status']}, errors {report['errors']}",
        f"server: {server['batches']:.0f} batches, mean size {server['mean_batch_size']}, "
        f"busy {server['busy_fraction']}, RSS "
        f"{server['rss_start_mb']} -> {server['rss_end_mb']} MB (peak {server['rss_peak_mb']}, "
        f"growth {server['rss_growth']})",
    ]
    for kind, fault in report["faults"].items():
        lines.append(f"fault {kind}: {fault['outcomes']}" + (" UNEXPECTED" if fault["unexpected"] else ""))
    if report.get("flood"):
        flood = report["flood"]
        lines.append(
            f"flood of {flood['sent']}: {flood['status']}, "
            f"503 with Retry-After {flood['503_with_retry_after']}"
        )
    if report.get("baseline"):
        b = report["baseline"]
        lines.append(
            f"in-process run_batch at batch {b['batch']}: {b['before']['images_per_s']:.3f} images/s "
            f"before, {b['after']['images_per_s']:.3f} after; "
            f"server/in-process {report['images_per_s'] / b['images_per_s']:.2f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    plan = plan_from(args)

    def measure() -> dict:
        from .baseline import baseline

        print(f"in-process baseline on {args.baseline} at batch {args.baseline_batch}", file=sys.stderr)
        return baseline(
            args.baseline, plan, args.variant, args.threads, args.baseline_batch, args.baseline_repeats
        )

    # The baseline before and after the load, so that a machine that gets busier or quieter during
    # the run moves both sides of the ratio.
    before = measure() if args.baseline else None
    report = run_load(plan)
    report["baseline"] = None
    if before is not None:
        after = measure()
        mean = round((before["images_per_s"] + after["images_per_s"]) / 2, 4)
        report["baseline"] = {
            "batch": before["batch"],
            "images_per_s": mean,
            "before": before,
            "after": after,
        }
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    problems = failed(report)
    for problem in problems:
        print(f"flonnx loadtest: {problem}", file=sys.stderr)
    return 1 if problems else 0
