"""`flonnx info [FOLDER]`: what this machine offers, or what a model folder holds.

Without a folder: flonnx and onnxruntime versions, execution providers, the CPU features the
quantization recipes care about (AVX2, AVX-512 VNNI / BF16, AMX), core counts and the default
thread count. With a folder: its source and format, each variant's dtypes and size, the validation
and quantization summaries, and whether its files verify. `--json` prints the same data as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from .errors import FlonnxError
from .folder import DTYPE_SUFFIXES, select
from .manifest import MANIFEST, VERIFY_MODES, read_manifest, verify_files
from .sessions import physical_cores

# /proc/cpuinfo flags that decide which int8/bf16 kernels onnxruntime and PyTorch can use.
CPU_FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "asimddp": "Arm dot product",
    "i8mm": "Arm I8MM",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("flonnx")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def machine() -> dict:
    import onnxruntime

    flags = _cpu_flags()
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    return {
        "flonnx": version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "cpu_features": [name for flag, name in CPU_FEATURES.items() if flag in flags],
        "logical_cpus": logical,
        "physical_cores": physical_cores(),
        "default_threads": physical_cores(),
    }


def _size(folder: Path, files) -> int:
    return sum((folder / f).stat().st_size for f in files if (folder / f).is_file())


def folder_info(folder: Path, check: str = "cached") -> dict:
    if not folder.is_dir():
        raise FlonnxError(f"model folder not found: {folder}")
    manifest = read_manifest(folder) if (folder / MANIFEST).exists() else None
    names = list((manifest or {}).get("variants", {}))
    names += [d for d in DTYPE_SUFFIXES if d not in names]
    variants = {}
    for name in names:
        try:
            selection = select(folder, manifest, name)
        except FlonnxError:
            continue  # a dtype this folder has no files for
        if any(selection.files == variants[other]["files"] for other in variants):
            continue  # a transformers.js name for a variant already listed (flonnx's int8 is q8)
        files = [*selection.files.values(), *selection.data]
        problem = None
        if manifest is not None and selection.listed:
            try:
                verify_files(folder, manifest, list(selection.listed), mode=check)
            except FlonnxError as error:
                problem = str(error)
        unlisted = [f for f in files if f not in selection.listed]
        variants[name] = {
            "files": selection.files,
            "dtypes": selection.dtypes,
            "bytes": _size(folder, files),
            "verified": problem is None and not unlisted,
            "problem": problem
            or (f"not recorded in {MANIFEST}: {', '.join(unlisted)}" if unlisted else None),
        }
    info = {"folder": str(folder), "manifest": manifest is not None, "variants": variants}
    if manifest is None:
        info["source"] = {"format": "onnx-community layout (no flonnx.json)"}
        return info
    info["source"] = {k: v for k, v in manifest.get("source", {}).items() if k != "weights_sha256"}
    info["model"] = manifest.get("model")
    validation = manifest.get("validation") or {}
    info["validation"] = {
        "passed": validation.get("passed"),
        "max_abs_diff": validation.get("max_abs_diff"),
        "token_parity": validation.get("token_parity"),
    }
    info["quantization"] = {
        name: {
            "recipe": entry.get("recipe", {}).get("name"),
            "passed": (entry.get("report") or {}).get("passed"),
        }
        for name, entry in manifest.get("quantization", {}).items()
    }
    return info


def _text(info: dict) -> str:
    if "variants" not in info:
        lines = [f"flonnx {info['flonnx']} (Python {info['python']}, {info['platform']})"]
        lines.append(f"onnxruntime {info['onnxruntime']}: {', '.join(info['providers'])}")
        lines.append(f"CPU features: {', '.join(info['cpu_features']) or 'none of note'}")
        lines.append(
            f"cores: {info['physical_cores']} physical, {info['logical_cpus']} logical; "
            f"default threads {info['default_threads']}"
        )
        return "\n".join(lines)
    source = info["source"]
    lines = [f"{info['folder']}: {source.get('format', '?')} source {source.get('id', '')}".rstrip()]
    if info.get("model"):
        model = info["model"]
        lines.append(
            f"model: image {model.get('image_size')} px, {model.get('num_image_tokens')} image tokens, "
            f"d_model {model.get('d_model')}, {model.get('decoder_layers')} decoder layers, "
            f"vocabulary {model.get('vocab_size')}"
        )
    if info.get("validation"):
        validation = info["validation"]
        diffs = ", ".join(f"{g} {d:.2g}" for g, d in (validation.get("max_abs_diff") or {}).items())
        state = "passed" if validation.get("passed") else "not passed"
        lines.append(f"validation: {state}; max abs diff {diffs}")
    for name, variant in info["variants"].items():
        dtypes = sorted(set(variant["dtypes"].values()))
        state = "verified" if variant["verified"] else f"NOT verified: {variant['problem']}"
        report = info.get("quantization", {}).get(name)
        quantized = f"; report {'passed' if report['passed'] else 'flagged'}" if report else ""
        lines.append(
            f"  {name:<14} {variant['bytes'] / 1e6:9.1f} MB  dtypes {', '.join(dtypes)}  {state}{quantized}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", nargs="?", help="a model folder (default: this machine)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="cached",
        help="how to check files: cached sha256 (default), sha256 every file, size only",
    )


def main(args: argparse.Namespace) -> int:
    info = machine() if args.folder is None else folder_info(Path(args.folder), args.verify)
    print(json.dumps(info, indent=2) if args.json else _text(info))
    return 0
