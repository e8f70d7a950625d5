"""`flonnx bench`: flonnx against PyTorch on the same random Florence-2 weights, in one run.

Both sides do identical work (forced lengths, greedy), alternate run by run, and every number is
a median with its spread. Ratios are against PyTorch measured in the same run, so a noisy machine
shifts both sides together. The floors (vision FLOPs over measured matmul throughput, decode-step
weight bytes over measured memory bandwidth) are measured here too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flonnx.runtime.errors import ExportError, InputError
from flonnx.runtime.manifest import read_manifest, variant_data_files

from .exporter import Progress

PROFILES = {"caption": ("<CAPTION>", 20), "detection": ("<OD>", 128)}
SIZES = ("tiny", "base", "large")
RECIPES = ("int8", "int4")
SERVER_BATCHES = (1, 4, 8)
BEAMS = 3


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
    threads: int | None = None
    cache: Path = Path("artifacts/bench/cache")
    out: Path = Path("artifacts/bench")
    profiles: tuple[str, ...] = tuple(PROFILES)
    variants: tuple[str, ...] | None = None  # None: fp32 and every recipe available
    server: bool = True

    def __post_init__(self):
        if self.size not in SIZES:
            raise InputError(f"unknown size {self.size!r}, expected one of: {', '.join(SIZES)}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise InputError(f"repeats must be a positive integer, got {self.repeats!r}")
        unknown = [p for p in self.profiles if p not in PROFILES]
        if unknown:
            raise InputError(f"unknown profile {', '.join(unknown)}, expected: {', '.join(PROFILES)}")


def _image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


# -- the machine's floors -------------------------------------------------------------------


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """float32 matmul throughput of onnxruntime's MLAS on this machine (a 1-op graph)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper  # the export extra brings onnx

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options)
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    session.run(None, {"a": a, "b": a})
    best = min(_timed(lambda: session.run(None, {"a": a, "b": a})) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large array copy (read + write counted)."""
    source = np.ones(megabytes * (1 << 20) // 4, np.float32)
    target = np.empty_like(source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def decode_step_bytes(folder: Path, manifest: dict, variant: str) -> int:
    """Bytes of the weights a later decoder step reads: the with-past branch's and shared ones.

    Tensors used only to compute the cross-attention K/V at the first step are not read again,
    and neither is the embedding table (one row per step)."""
    import onnx

    path = folder / manifest["variants"][variant]["decoder_model_merged"]["file"]
    model = onnx.load(str(path))
    outer = {t.name: t for t in model.graph.initializer}
    if_node = next((n for n in model.graph.node if n.op_type == "If"), None)
    if if_node is None:
        return sum(_nbytes(t) for t in outer.values())
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    used = {name for node in then.node for name in node.input}
    total = sum(_nbytes(t) for t in then.initializer)
    total += sum(_nbytes(t) for name, t in outer.items() if name in used)
    return total


def _nbytes(tensor) -> int:
    from onnx import helper

    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# -- the two sides ---------------------------------------------------------------------------


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


class TorchSide:
    def __init__(self, checkpoint: Path, threads: int):
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = Florence2ForConditionalGeneration.from_pretrained(checkpoint).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)

    def run(self, image, task: str, new_tokens: int) -> tuple[list[int], float]:
        started = time.perf_counter()
        inputs = self.processor(text=task, images=image, return_tensors="pt")
        with self.torch.no_grad():
            ids = self.model.generate(
                **inputs, num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        text = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        self.processor.post_process_generation(text, task=task, image_size=image.size)
        return ids[0].tolist(), time.perf_counter() - started

    def vision_flops(self, image) -> float:
        """FLOPs of one vision encoder pass, counted by PyTorch on the module itself."""
        from torch.utils.flop_counter import FlopCounterMode

        inputs = self.processor(text="<CAPTION>", images=image, return_tensors="pt")
        with self.torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model.get_image_features(inputs["pixel_values"])
        return float(counter.get_total_flops())

    def vision(self, image) -> float:
        inputs = self.processor(text="<CAPTION>", images=image, return_tensors="pt")
        with self.torch.no_grad():
            return _timed(lambda: self.model.get_image_features(inputs["pixel_values"]))


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


def run_bench(options: BenchOptions, progress: Progress | None = None) -> dict:
    from flonnx.runtime import Florence2
    from flonnx.runtime.sessions import physical_cores

    progress = progress or Progress()
    threads = options.threads or physical_cores()
    checkpoint, folder = prepare(options, progress)
    manifest = read_manifest(folder)
    variants = [v for v in (options.variants or manifest["variants"]) if v in manifest["variants"]]
    progress(f"loading PyTorch and flonnx ({', '.join(variants)}), {threads} threads")
    torch_side = TorchSide(checkpoint, threads)
    models = {v: Florence2.load(folder, variant=v, threads=threads) for v in variants}
    image = _image()

    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
        },
        "size": options.size,
        "repeats": options.repeats,
        "variants": variants,
        "profiles": {},
    }
    for name in options.profiles:
        task, new_tokens = PROFILES[name]
        progress(f"profile {name}: {task}, {new_tokens} new tokens, {options.repeats} repeats")
        # warm-up, and the parity check of fp32 against PyTorch
        reference, _ = torch_side.run(image, task, new_tokens)
        parity = {}
        for variant, model in models.items():
            (result,), _, warm = _run_flonnx(model, image, task, new_tokens)
            agree = sum(a == b for a, b in zip(result.tokens, reference)) / max(len(reference), 1)
            parity[variant] = {"equal": result.tokens == reference, "agreement": agree}
        if "fp32" in parity and not parity["fp32"]["equal"]:
            raise RuntimeError(f"fp32 tokens differ from PyTorch on {task}: the export is broken")
        torch_time = Timing()
        flonnx_time = {v: Timing() for v in variants}
        stages = {
            v: {k: Timing() for k in ("preprocess", "vision", "encoder", "first_step", "step", "postprocess")}
            for v in variants
        }
        for repeat in range(options.repeats):
            torch_time.add(torch_side.run(image, task, new_tokens)[1])
            for variant, model in models.items():
                _, seconds, timings = _run_flonnx(model, image, task, new_tokens)
                flonnx_time[variant].add(seconds)
                steps = max(timings["steps"] - 1, 1)
                for stage in ("preprocess", "vision", "encoder", "first_step", "postprocess"):
                    stages[variant][stage].add(timings.get(stage, 0.0))
                stages[variant]["step"].add((timings["decode"] - timings["first_step"]) / steps)
            progress(
                f"  repeat {repeat + 1}/{options.repeats}: torch {torch_time.runs[-1]:.2f}s, "
                + ", ".join(f"{v} {flonnx_time[v].runs[-1]:.2f}s" for v in variants)
            )
        report["profiles"][name] = {
            "task": task,
            "new_tokens": new_tokens,
            "encoder_tokens": warm["encoder_tokens"],
            "parity": parity,
            "torch": torch_time.summary(),
            "flonnx": {
                v: {
                    "end_to_end": flonnx_time[v].summary(),
                    "speedup_vs_torch": torch_time.median / flonnx_time[v].median,
                    "tokens_per_s": new_tokens / flonnx_time[v].median,
                    "stages": {k: t.median for k, t in stages[v].items()},
                }
                for v in variants
            },
        }

    progress("vision encoder alone, PyTorch")
    torch_vision = Timing()
    for _ in range(options.repeats):
        torch_vision.add(torch_side.vision(image))
    report["torch_vision"] = torch_vision.summary()

    if "detection" in options.profiles:
        task, new_tokens = PROFILES["detection"]
        progress(f"beam search: {task}, {new_tokens} tokens, num_beams={BEAMS} against greedy")
        report["beam"] = {}
        for variant, model in models.items():
            greedy, beam = Timing(), Timing()
            for _ in range(options.repeats):
                greedy.add(_run_flonnx(model, image, task, new_tokens)[1])
                beam.add(_run_flonnx(model, image, task, new_tokens, beams=BEAMS)[1])
            report["beam"][variant] = {
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

    progress("floors: matmul throughput, memory bandwidth")
    gflops, bandwidth = matmul_gflops(threads), memory_bandwidth()
    vision_flops = torch_side.vision_flops(image)
    report["floors"] = {
        "matmul_gflops": gflops,
        "memory_gb_s": bandwidth,
        "vision_gflop": vision_flops / 1e9,
        "vision_floor_s": vision_flops / 1e9 / gflops,
        "decode_step": {},
    }
    measured = report["profiles"].get("detection", report["profiles"].get("caption", {}))
    for variant in variants:
        step_bytes = decode_step_bytes(folder, manifest, variant)
        floor = step_bytes / 1e9 / bandwidth
        step = measured.get("flonnx", {}).get(variant, {}).get("stages", {}).get("step")
        # Not weights, but read by every step all the same: the cross-attention K/V over the
        # encoder output and the self-attention K/V at the measured steps' mean length.
        cache = cache_bytes(
            models[variant].layout, measured.get("encoder_tokens", 0), measured.get("new_tokens", 0)
        )
        with_cache = (step_bytes + cache) / 1e9 / bandwidth
        report["floors"]["decode_step"][variant] = {
            "weight_bytes": step_bytes,
            "floor_s": floor,
            "measured_s": step,
            "over_floor": step / floor if step else None,
            "cache_bytes": cache,
            "floor_with_cache_s": with_cache,
            "over_floor_with_cache": step / with_cache if step else None,
        }
    return report


def cache_bytes(layout, encoder_tokens: int, new_tokens: int) -> int:
    """float32 K/V bytes one batch-1 decoder step reads after the first: every layer's cross-attention
    K and V over `encoder_tokens`, and its self-attention K and V at the mean length of steps 2 to
    `new_tokens` (the steps the bench times)."""
    mean_length = (2 + new_tokens) / 2 if new_tokens > 1 else 0
    return int(layout.layers * 2 * (encoder_tokens + mean_length) * layout.heads * layout.head_dim * 4)


def markdown(report: dict) -> str:
    lines = [
        f"flonnx bench: `{report['size']}` random weights, {report['machine']['threads']} threads, "
        f"{report['machine']['processor']} ({report['machine']['platform']}), "
        f"medians of {report['repeats']} runs",
        "",
        "| profile | variant | end-to-end s | vs PyTorch | tokens/s | vision s | encoder s | step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, profile in report["profiles"].items():
        lines.append(
            f"| {name} | PyTorch | {profile['torch']['median']:.2f} | 1.00x | "
            f"{profile['new_tokens'] / profile['torch']['median']:.1f} | | | |"
        )
        for variant, row in profile["flonnx"].items():
            s = row["stages"]
            cells = [
                name,
                f"flonnx {variant}",
                f"{row['end_to_end']['median']:.2f}",
                f"{row['speedup_vs_torch']:.2f}x",
                f"{row['tokens_per_s']:.1f}",
                f"{s['vision']:.2f}",
                f"{s['encoder']:.2f}",
                f"{1000 * s['step']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| variant | bundle MB | peak RSS MB | RSS / bundle | process before load MB | cold start s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in report["runtime"].items():
        lines.append(
            f"| {variant} | {row['bundle_bytes'] / 1e6:.0f} | {row['peak_rss_bytes'] / 1e6:.0f} | "
            f"{row['rss_over_bundle']:.2f} | {row['runtime_import_rss_bytes'] / 1e6:.0f} | "
            f"{row['cold_start_s']:.2f} |"
        )
    floors = report["floors"]
    lines += [
        "",
        f"Floors: matmul {floors['matmul_gflops']:.0f} GFLOP/s, memory {floors['memory_gb_s']:.1f} GB/s; "
        f"vision {floors['vision_gflop']:.3g} GFLOP -> {floors['vision_floor_s']:.3g} s "
        f"(PyTorch vision {report['torch_vision']['median']:.2f} s).",
    ]
    for variant, row in floors["decode_step"].items():
        over = (
            f", measured {1000 * row['measured_s']:.1f} ms = {row['over_floor']:.2f}x floor"
            if row["measured_s"]
            else ""
        )
        lines.append(
            f"- decode step {variant}: {row['weight_bytes'] / 1e6:.0f} MB of weights -> "
            f"floor {1000 * row['floor_s']:.1f} ms{over}"
        )
        if row.get("cache_bytes"):
            with_cache = f" = {row['over_floor_with_cache']:.2f}x" if row["measured_s"] else ""
            lines.append(
                f"  - with the {row['cache_bytes'] / 1e6:.0f} MB of K/V cache a step also reads: "
                f"floor {1000 * row['floor_with_cache_s']:.1f} ms{with_cache}"
            )
    if "beam" in report:
        lines += [
            "",
            f"Beam search (detection, num_beams={BEAMS}) against greedy: "
            + "; ".join(
                f"{v} {r['beam']['median']:.2f} s / {r['greedy']['median']:.2f} s = {r['cost']:.2f}x"
                for v, r in report["beam"].items()
            ),
        ]
    if "server" in report:
        lines += [
            "",
            "Server profile (detection, images/s): "
            + "; ".join(
                f"{v}: " + ", ".join(f"batch {b} {r['images_per_s']:.2f}" for b, r in rows.items())
                for v, rows in report["server"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"bench-{report['size']}.json", out / f"bench-{report['size']}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="base", choices=SIZES, help="model shape (default base)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (default 3)")
    parser.add_argument("--threads", type=int, help="threads for both sides (default: physical cores)")
    parser.add_argument("--cache", default="artifacts/bench/cache", help="where models and exports are kept")
    parser.add_argument("--out", default="artifacts/bench", help="where the JSON and markdown go")
    parser.add_argument("--profile", action="append", choices=list(PROFILES), help="default: all")
    parser.add_argument("--variant", action="append", help="default: fp32 and every quantized variant")
    parser.add_argument("--no-server", action="store_true", help="skip the batch 1/4/8 server profile")


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
    )
    report = run_bench(options)
    json_path, md_path = write_report(report, options.out)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
