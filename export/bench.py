"""`flonnx bench`: flonnx against its peers on the same random Florence-2 weights, in one run.

The peers are the runtimes a user would pick instead (bench_peers.py): PyTorch in float32 and in
bfloat16, and transformers.js in Node on our fp32 and int8 folders and on an onnx-community-style
q8 folder. Every side does identical work (forced lengths, greedy); the sides alternate run by run
inside the repeats loop, so a noisy machine shifts them together, and every number is a median with
its spread. Ratios are against PyTorch float32 measured in the same run. The floors the timings are
divided by (sgemm, int8 GEMM, memory bandwidth; bench_floors.py) are measured in the same run too,
and bench_report.py writes the tables and checks issue 16's targets.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flonnx.runtime.errors import ExportError, InputError
from flonnx.runtime.manifest import read_manifest, variant_data_files

from . import bench_floors as floors
from .bench_peers import (
    TorchSide,
    TransformersJsSide,
    bf16_reason,
    community_folder,
    js_dtype,
    transformers_js_missing,
)
from .bench_report import markdown, targets, write_report
from .exporter import Progress

PROFILES = {"caption": ("<CAPTION>", 20), "detection": ("<OD>", 128)}
SIZES = ("tiny", "base", "large")
RECIPES = ("int8", "int4")
SERVER_BATCHES = (1, 4, 8)
BEAMS = 3
BF16_MODES = ("auto", "on", "off")
STAGES = ("preprocess", "vision", "encoder", "first_step", "step", "postprocess")


@dataclass
class Timing:
    """Seconds of repeated runs of one thing: median and spread."""

    runs: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.runs.append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    def summary(self) -> dict:
        return {"median": self.median, "min": min(self.runs), "max": max(self.runs), "runs": self.runs}


@dataclass(frozen=True)
class BenchOptions:
    size: str = "base"
    repeats: int = 3
    threads: int | None = None  # None: physical cores
    cache: Path = Path("artifacts/bench/cache")
    out: Path = Path("artifacts/bench")
    profiles: tuple[str, ...] = tuple(PROFILES)
    variants: tuple[str, ...] | None = None  # None: fp32 and every recipe available
    server: bool = True
    beam: bool = True
    transformers_js: bool = True
    bf16: str = "auto"  # PyTorch bfloat16 peer: "auto" = where the CPU has AVX-512 BF16 or AMX-BF16

    def __post_init__(self):
        if self.size not in SIZES:
            raise InputError(f"unknown size {self.size!r}, expected one of: {', '.join(SIZES)}")
        if not isinstance(self.repeats, int) or isinstance(self.repeats, bool) or self.repeats < 1:
            raise InputError(f"repeats must be a positive integer, got {self.repeats!r}")
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise InputError(f"threads must be a positive integer, got {self.threads!r}")
        unknown = [p for p in self.profiles if p not in PROFILES]
        if unknown:
            raise InputError(f"unknown profile {', '.join(unknown)}, expected: {', '.join(PROFILES)}")
        if self.bf16 not in BF16_MODES:
            raise InputError(f"unknown --bf16 value {self.bf16!r}, expected one of: {', '.join(BF16_MODES)}")


def _image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


def _input_size(folder: Path) -> tuple[int, int]:
    size = json.loads((folder / "preprocessor_config.json").read_text())["size"]
    return size["width"], size["height"]


def prepare(options: BenchOptions, progress: Progress) -> tuple[Path, Path]:
    """The cached checkpoint and its export (built on first use), with quantized variants."""
    from .exporter import export
    from .testmodels import save_model

    checkpoint = options.cache / f"{options.size}-checkpoint"
    folder = options.cache / f"{options.size}-onnx"
    if not (checkpoint / "config.json").is_file():
        progress(f"building the {options.size} model with seeded random weights")
        save_model(options.size, checkpoint, seed=0)
    if not (folder / "flonnx.json").is_file():
        progress(f"exporting {checkpoint}")
        export(str(checkpoint), folder, force=True, progress=progress)
    manifest = read_manifest(folder)
    wanted = options.variants or ("fp32", *RECIPES)
    for recipe in RECIPES:
        if recipe not in wanted or not _quantize_available():
            continue
        from flonnx.quantize.cli import EXIT_REPORT_FAILED
        from flonnx.quantize.recipes import get_recipe

        made_with = manifest.get("quantization", {}).get(recipe, {}).get("recipe")
        if recipe not in manifest["variants"] or made_with != get_recipe(recipe).as_dict():
            progress(f"quantizing: {recipe}" + (" (made by another recipe version)" if made_with else ""))
            flonnx = str(Path(sys.executable).with_name("flonnx"))
            done = subprocess.run([flonnx, "quantize", str(folder), "--recipe", recipe])
            listed = recipe in read_manifest(folder)["variants"]
            if done.returncode == EXIT_REPORT_FAILED and listed:
                # Random weights are harder on quantization than trained ones; speed is the same.
                progress(f"{recipe}: its quantize report flagged accuracy (above); timed all the same")
            elif done.returncode != 0:
                raise ExportError(
                    f"flonnx quantize {folder} --recipe {recipe} failed (exit {done.returncode})"
                )
    return checkpoint, folder


def _quantize_available() -> bool:
    try:
        import flonnx.quantize.cli  # noqa: F401
    except ImportError:
        return False
    return True


def _run_flonnx(model, image, task: str, new_tokens: int, batch: int = 1, beams: int = 1):
    from flonnx.runtime import Request

    timings: dict = {}
    started = time.perf_counter()
    results = model.run_batch(
        [Request(image, task)] * batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_beams=beams,
        timings=timings,
    )
    return results, time.perf_counter() - started, timings


# -- subprocess measurements of the runtime alone --------------------------------------------

_RUNTIME_PROBE = """
import json, resource, sys, time
def status():
    return dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
started = time.perf_counter()
from flonnx.runtime import Florence2
# The process before any model: Python, numpy, onnxruntime, tokenizers, pillow.
before = int(status().get("VmRSS", "0 kB").split()[0]) * 1024
model = Florence2.load(sys.argv[1], variant=sys.argv[2], threads=int(sys.argv[3]))
cold = time.perf_counter() - started
import numpy as np
from PIL import Image
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
for _ in range(2):  # a process serves more than one request: the second shows the steady state
    model.run(image, "<CAPTION>", max_new_tokens=20, min_new_tokens=20, num_beams=1)
heavy = sorted({"torch", "transformers", "onnx", "onnxscript"} & {m.split(".")[0] for m in sys.modules})
# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork + exec.
final = status()
peak = int(final["VmHWM"].split()[0]) * 1024 if "VmHWM" in final else (
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"cold_start_s": cold, "peak_rss_bytes": peak, "runtime_import_rss_bytes": before,
                  "heavy_imports": heavy}))
"""


def runtime_probe(folder: Path, variant: str, threads: int) -> dict:
    """Cold start and peak RSS in a fresh process that imports only the runtime."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _RUNTIME_PROBE, str(folder), variant, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def bundle_bytes(folder: Path, manifest: dict, variant: str) -> int:
    files = [entry["file"] for entry in manifest["variants"][variant].values()]
    files += variant_data_files(manifest, variant)
    return sum((folder / name).stat().st_size for name in files)


# -- the run ---------------------------------------------------------------------------------


def _agreement(tokens: list[int], reference: list[int]) -> dict:
    same = sum(a == b for a, b in zip(tokens, reference)) / max(len(reference), 1)
    return {"equal": tokens == reference, "agreement": same}


def _load_peers(options, checkpoint, folder, manifest, threads, cpu, report, progress) -> dict:
    """The peers beside PyTorch float32: {key: (label, side)}; skipped ones say why."""
    peers: dict = {}
    run_bf16, why = bf16_reason(options.bf16, cpu)
    progress(f"PyTorch bf16: {'timed' if run_bf16 else 'skipped'}: {why}")
    if run_bf16:
        peers["pytorch_bf16"] = ("PyTorch bf16", TorchSide(checkpoint, threads, bfloat16=True))
    else:
        report["skipped"]["PyTorch bf16"] = why
    missing = "--no-transformers-js" if not options.transformers_js else transformers_js_missing()
    if missing:
        progress(f"transformers.js: skipped: {missing}")
        report["skipped"]["transformers.js"] = missing
        return peers
    community = community_folder(folder, options.cache / f"{options.size}-community", progress)
    folders = [("tjs_community_q8", "community q8", community, "q8")]
    for variant in ("fp32", "int8"):
        dtype = js_dtype(manifest, variant) if variant in manifest["variants"] else None
        if dtype:
            folders.append((f"tjs_{variant}", f"flonnx {variant}", folder, dtype))
    for key, name, path, dtype in folders:
        progress(f"loading transformers.js on {name} ({path}, dtype {dtype})")
        peers[key] = (f"transformers.js, {name}", TransformersJsSide(path, dtype, threads))
    return peers


def _time_profile(name, options, torch_side, peers, models, image, image_file, progress) -> dict:
    """One profile: a warm-up run per side (tokens checked against PyTorch), then the repeats."""
    task, new_tokens = PROFILES[name]
    progress(f"profile {name}: {task}, {new_tokens} new tokens, {options.repeats} repeats")

    def run_peer(side):
        if isinstance(side, TorchSide):
            return side.run(image, task, new_tokens)
        return side.run(image_file, task, new_tokens)

    reference, _ = torch_side.run(image, task, new_tokens)
    parity, peer_parity = {}, {}
    for variant, model in models.items():
        (result,), _, warm = _run_flonnx(model, image, task, new_tokens)
        parity[variant] = _agreement(result.tokens, reference)
    if "fp32" in parity and not parity["fp32"]["equal"]:
        raise RuntimeError(f"fp32 tokens differ from PyTorch on {task}: the export is broken")
    for key, (label, side) in peers.items():
        peer_parity[key] = _agreement(run_peer(side)[0], reference)
        if key == "tjs_fp32" and not peer_parity[key]["equal"]:
            progress(f"  {label}: tokens differ from PyTorch's ({peer_parity[key]['agreement']:.0%} agree)")
    torch_time = Timing()
    peer_time = {key: Timing() for key in peers}
    flonnx_time = {v: Timing() for v in models}
    stages = {v: {k: Timing() for k in STAGES} for v in models}
    for repeat in range(options.repeats):
        torch_time.add(torch_side.run(image, task, new_tokens)[1])
        for key, (_, side) in peers.items():
            peer_time[key].add(run_peer(side)[1])
        for variant, model in models.items():
            _, seconds, timings = _run_flonnx(model, image, task, new_tokens)
            flonnx_time[variant].add(seconds)
            for stage in ("preprocess", "vision", "encoder", "first_step", "postprocess"):
                stages[variant][stage].add(timings.get(stage, 0.0))
            steps = max(timings["steps"] - 1, 1)
            stages[variant]["step"].add((timings["decode"] - timings["first_step"]) / steps)
        times = [("torch", torch_time)] + [(k, t) for k, t in peer_time.items()] + list(flonnx_time.items())
        progress(
            f"  repeat {repeat + 1}/{options.repeats}: "
            + ", ".join(f"{k} {t.runs[-1]:.2f}s" for k, t in times)
        )

    def row(timing: Timing) -> dict:
        return {
            "end_to_end": timing.summary(),
            "speedup_vs_torch": torch_time.median / timing.median,
            "tokens_per_s": new_tokens / timing.median,
        }

    return {
        "task": task,
        "new_tokens": new_tokens,
        "encoder_tokens": warm["encoder_tokens"],
        "parity": parity,
        "torch": torch_time.summary(),
        "peers": {
            key: {"label": label, **row(peer_time[key]), "parity": peer_parity[key]}
            for key, (label, _) in peers.items()
        },
        "flonnx": {
            v: {
                **row(flonnx_time[v]),
                "stages": {k: t.median for k, t in stages[v].items()},
                "vision_runs": stages[v]["vision"].runs,
            }
            for v in models
        },
    }


def _measure_floors(report, folder, manifest, models, threads, rates, progress) -> dict:
    """The floors: `rates` (measured before the timings) and a second measurement now, best of
    each; the vision encoder's FLOPs per variant; the decode step's bytes."""
    progress("floors: sgemm, int8 GEMM, memory bandwidth, vision FLOPs per variant")
    found = floors.best_rates([rates, floors.machine_rates(threads)])
    sgemm, int8_gemm, bandwidth = found["sgemm_gflops"], found["int8_gemm_gops"], found["memory_gb_s"]
    width, height = _input_size(folder)
    pixels = {"pixel_values": np.zeros((1, 3, height, width), np.float32)}
    found["vision"], found["decode_step"] = {}, {}
    profiles = report["profiles"]
    for variant in models:
        flops = floors.graph_flops(
            folder / manifest["variants"][variant]["vision_encoder"]["file"], pixels, threads
        )
        # every vision pass the profiles timed, caption's and detection's
        runs = [t for p in profiles.values() for t in p["flonnx"].get(variant, {}).get("vision_runs", [])]
        vision_s = statistics.median(runs) if runs else None
        floor = floors.vision_floor(flops, sgemm, int8_gemm)
        found["vision"][variant] = {
            "integer_gflop": flops["integer"] / 1e9,
            "float_gflop": flops["float"] / 1e9,
            "gflop_by_op": {op: value / 1e9 for op, value in sorted(flops["by_op"].items())},
            "floor_s": floor,
            "measured_s": vision_s,
            "over_floor": vision_s / floor if vision_s else None,
        }
    decoding = profiles.get("detection") or profiles.get("caption") or {}
    for variant, model in models.items():
        path = folder / manifest["variants"][variant]["decoder_model_merged"]["file"]
        step_bytes = floors.decode_step_bytes(path)
        floor = step_bytes / 1e9 / bandwidth
        step = decoding.get("flonnx", {}).get(variant, {}).get("stages", {}).get("step")
        # Not weights, but read by every step all the same: the cross-attention K/V over the
        # encoder output and the self-attention K/V at the measured steps' mean length.
        cache = floors.cache_bytes(
            model.layout, decoding.get("encoder_tokens", 0), decoding.get("new_tokens", 0)
        )
        with_cache = (step_bytes + cache) / 1e9 / bandwidth
        found["decode_step"][variant] = {
            "weight_bytes": step_bytes,
            "floor_s": floor,
            "measured_s": step,
            "over_floor": step / floor if step else None,
            "cache_bytes": cache,
            "floor_with_cache_s": with_cache,
            "over_floor_with_cache": step / with_cache if step else None,
        }
    return found


def run_bench(options: BenchOptions, progress: Progress | None = None) -> dict:
    from flonnx.runtime import Florence2
    from flonnx.runtime.sessions import physical_cores

    progress = progress or Progress()
    threads = options.threads or physical_cores()
    checkpoint, folder = prepare(options, progress)
    manifest = read_manifest(folder)
    variants = [v for v in (options.variants or manifest["variants"]) if v in manifest["variants"]]
    cpu = floors.cpu_features()
    report: dict = {
        "machine": {
            "cpu": cpu["model"],
            **{name: cpu[name] for name in floors.CPU_FEATURES},
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
        },
        "size": options.size,
        "repeats": options.repeats,
        "variants": variants,
        "skipped": {},
        "profiles": {},
    }
    image = _image()
    peers: dict = {}
    with tempfile.TemporaryDirectory(prefix="flonnx-bench-") as scratch:
        # transformers.js gets the image already at the model's input size, resized as flonnx
        # resizes it (PIL bicubic): Node's resize (sharp, not antialiased) would change the pixels.
        image_file = Path(scratch) / "image.png"
        image.resize(_input_size(folder), resample=3).save(image_file)
        try:
            progress(f"loading PyTorch fp32 and flonnx ({', '.join(variants)}), {threads} threads")
            torch_side = TorchSide(checkpoint, threads)
            models = {v: Florence2.load(folder, variant=v, threads=threads) for v in variants}
            peers = _load_peers(options, checkpoint, folder, manifest, threads, cpu, report, progress)
            progress("floors before the timings: sgemm, int8 GEMM, memory bandwidth")
            rates = floors.machine_rates(threads)
            for name in options.profiles:
                report["profiles"][name] = _time_profile(
                    name, options, torch_side, peers, models, image, image_file, progress
                )
        finally:
            for _, side in peers.values():
                if isinstance(side, TransformersJsSide):
                    side.close()

    progress("vision encoder alone, PyTorch")
    torch_vision = Timing()
    for _ in range(options.repeats):
        torch_vision.add(torch_side.vision(image))
    report["torch_vision"] = torch_vision.summary()
    del torch_side, peers  # PyTorch's memory back before the probes

    if options.beam and "detection" in options.profiles:
        task, new_tokens = PROFILES["detection"]
        progress(f"beam search: {task}, {new_tokens} tokens, num_beams={BEAMS} against greedy")
        report["beam"] = {}
        for variant, model in models.items():
            greedy, beam = Timing(), Timing()
            for _ in range(options.repeats):
                greedy.add(_run_flonnx(model, image, task, new_tokens)[1])
                beam.add(_run_flonnx(model, image, task, new_tokens, beams=BEAMS)[1])
            report["beam"][variant] = {
                "beams": BEAMS,
                "greedy": greedy.summary(),
                "beam": beam.summary(),
                "cost": beam.median / greedy.median,
            }

    if options.server and "detection" in options.profiles:
        progress("server profile: detection, batch 1, 4, 8")
        report["server"] = {}
        for variant, model in models.items():
            report["server"][variant] = {}
            for batch in SERVER_BATCHES:
                _, seconds, _ = _run_flonnx(model, image, "<OD>", PROFILES["detection"][1], batch)
                report["server"][variant][str(batch)] = {"seconds": seconds, "images_per_s": batch / seconds}

    progress("cold start and peak RSS, runtime alone in a fresh process")
    report["runtime"] = {}
    for variant in variants:
        probe = runtime_probe(folder, variant, threads)
        size = bundle_bytes(folder, manifest, variant)
        probe.update(bundle_bytes=size, rss_over_bundle=probe["peak_rss_bytes"] / size)
        report["runtime"][variant] = probe

    report["floors"] = _measure_floors(report, folder, manifest, models, threads, rates, progress)
    report["targets"] = targets(report)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="base", choices=SIZES, help="model shape (default base)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (default 3)")
    parser.add_argument("--threads", type=int, help="threads for every side (default: physical cores)")
    parser.add_argument("--cache", default="artifacts/bench/cache", help="where models and exports are kept")
    parser.add_argument("--out", default="artifacts/bench", help="where the JSON and markdown go")
    parser.add_argument("--profile", action="append", choices=list(PROFILES), help="default: all")
    parser.add_argument("--variant", action="append", help="default: fp32 and every quantized variant")
    parser.add_argument("--no-server", action="store_true", help="skip the batch 1/4/8 server profile")
    parser.add_argument("--no-beam", action="store_true", help="skip beam search against greedy")
    parser.add_argument(
        "--no-transformers-js", action="store_true", help="skip the transformers.js (Node) peers"
    )
    parser.add_argument(
        "--bf16",
        default="auto",
        metavar="auto|on|off",
        help="the PyTorch bfloat16 peer: auto (where the CPU has avx512_bf16 or amx_bf16), on, off",
    )


def main(args) -> int:
    options = BenchOptions(
        size=args.size,
        repeats=args.repeats,
        threads=args.threads,
        cache=Path(args.cache),
        out=Path(args.out),
        profiles=tuple(args.profile or PROFILES),
        variants=tuple(args.variant) if args.variant else None,
        server=not args.no_server,
        beam=not args.no_beam,
        transformers_js=not args.no_transformers_js,
        bf16=args.bf16,
    )
    report = run_bench(options)
    json_path, md_path = write_report(report, options.out)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
