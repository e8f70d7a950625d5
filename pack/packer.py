"""`pack(folder, target)`: one variant of an export folder, written as a new folder for a device.

A pack is a model folder like an export: its flonnx.json lists the packed graphs as one variant,
named as in the source, with every file's size and sha256, so `Florence2.load(PACK, variant=...)`
and `flonnx run PACK ... --variant ...` verify and run it. It is built in a staging folder beside
OUT, loaded and run against the source variant, and renamed into place only then: an error or an
interruption leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flonnx.runtime.errors import InputError, ModelFolderError
from flonnx.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    file_record,
    read_manifest,
    variant_data_files,
    variant_files,
    verify_files,
    write_json_atomic,
)

from . import mobile, readme, readme_web, web
from .check import check_line, compare, same_answers, same_answers_line, same_answers_passed
from .check import passed as check_passed
from .folder import Progress, check_out, copy_file, move_into_place, prepare, recover

TARGETS = {
    "mobile": "ORT-format graphs for ONNX Runtime Mobile (Android, iOS), a reduced-build operator "
    "config, NNAPI/CoreML usability",
    "web": "a transformers.js model folder for browsers and an offline page that runs it "
    "(WebAssembly; WebGPU where the browser has it)",
}
DEFAULT_VARIANTS = ("int8", "fp32")  # the first one the folder lists


@dataclass(frozen=True)
class PackResult:
    folder: Path
    variant: str
    manifest: dict

    @property
    def check(self) -> dict | None:
        return self.manifest["pack"].get("check")

    @property
    def model_folder(self) -> Path:
        """What `Florence2.load` reads: the pack itself, or its model folder (web)."""
        return self.folder / self.manifest["pack"].get("model_dir", "")

    @property
    def passed(self) -> bool:
        """No check ran, or the pack computed what the source variant computes (see check.py)."""
        if self.check is None:
            return True
        if self.manifest["pack"]["target"] == "web":
            return same_answers_passed(self.check)
        return check_passed(self.check)


def choose_variant(folder: Path, manifest: dict, variant: str | None) -> str:
    listed = list(manifest.get("variants", {}))
    if variant is None:
        for name in DEFAULT_VARIANTS:
            if name in listed:
                return name
        raise ModelFolderError(f"{folder} lists neither int8 nor fp32; choose one of: {', '.join(listed)}")
    if variant not in listed:
        raise InputError(f"unknown variant {variant!r} for {folder}; available: {', '.join(listed)}")
    return variant


def default_out(folder: Path, target: str, variant: str, static: bool) -> Path:
    return folder.parent / f"{folder.name}-{target}-{variant}{'-static' if static else ''}"


def _versions() -> dict:
    import onnx
    import onnxruntime

    from flonnx.runtime.info import version

    return {"flonnx": version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _manifest(manifest: dict, variant: str, entry: dict, files: dict, target: str, sources, details) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": manifest.get("source", {}),
        "tools": manifest.get("tools", {}),
        "model": manifest.get("model", {}),
        "variants": {variant: entry},
        "io": manifest.get("io", {}),
        "files": files,
        "validation": manifest.get("validation"),  # the source export's, against PyTorch
        "pack": {
            "target": target,
            "source": {
                "folder": str(details.pop("source_folder")),
                "variant": variant,
                "files": {name: manifest["files"][name]["sha256"] for name in sources},
            },
            **details,
            "tools": _versions(),
            "check": None,
        },
    }


def pack(
    folder: str | os.PathLike,
    target: str = "mobile",
    *,
    variant: str | None = None,
    out: str | os.PathLike | None = None,
    static: bool = False,
    force: bool = False,
    check: bool = True,
    threads: int | None = None,
    node_modules: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> PackResult:
    """Pack `variant` (default: int8 if listed, else fp32) of the export `folder` for `target` into
    `out` (default: FOLDER-TARGET-VARIANT beside it). `static` (mobile) fixes the vision encoder's
    input to one image of the model's size; `node_modules` (web) holds the pinned transformers.js
    the page is built from (default: flonnx's js/node_modules); `check` runs the pack against the
    source variant first."""
    progress = progress or Progress()
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    if static and target != "mobile":
        raise InputError(f"static shapes are an option of the mobile target, not of {target!r}")
    if node_modules is not None and target != "web":
        raise InputError(f"node_modules is an option of the web target, not of {target!r}")
    library = web.find_library(node_modules) if target == "web" else None
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = choose_variant(folder, manifest, variant)
    out = Path(out) if out is not None else default_out(folder, target, variant, static)
    recover(out)
    check_out(out, folder, force)

    progress(f"verifying variant {variant!r} of {folder}")
    sources = sorted({*variant_files(manifest, variant).values(), *variant_data_files(manifest, variant)})
    copied = [name for name in manifest.get("files", {}) if "/" not in name and name != MANIFEST]
    verify_files(folder, manifest, [*sources, *copied], mode="cached")
    staging = prepare(out)
    try:
        job = _Job(folder, manifest, variant, staging, out.name, sources, copied, check, threads, progress)
        result = _build_mobile(job, static) if target == "mobile" else _build_web(job, library)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sizes = result["pack"]["sizes"]
    progress(
        f"done: {out} ({sizes['pack_graphs'] / 1e6:.1f} MB of graphs; "
        f"source variant {sizes['source_variant'] / 1e6:.1f} MB)"
    )
    return PackResult(out, variant, result)


@dataclass(frozen=True)
class _Job:
    folder: Path
    manifest: dict
    variant: str
    staging: Path
    name: str  # of OUT
    sources: list[str]  # the variant's graphs and data files in the source folder
    copied: list[str]  # the source folder's configs and tokenizer, copied as they are
    check: bool
    threads: int | None
    progress: Progress


def _build_mobile(job: _Job, static: bool) -> dict:
    folder, manifest, variant = job.folder, job.manifest, job.variant
    staging, progress = job.staging, job.progress
    built = mobile.build(folder, manifest, variant, staging, static, progress)
    for name in job.copied:
        copy_file(folder / name, staging / name)
    files = {name: file_record(staging, name) for name in [*built.written, *job.copied]}
    details = {"source_folder": folder.resolve(), **built.details}
    result = _manifest(manifest, variant, built.entry, files, "mobile", job.sources, details)
    write_json_atomic(staging / MANIFEST, result)
    if job.check:
        progress(f"checking the pack's answers against variant {variant!r} of the source")
        converted = built.converted["vision_encoder"]
        result["pack"]["check"] = compare(folder, variant, staging, variant, converted, job.threads)
        progress(check_line(result["pack"]["check"]))
    shutil.rmtree(built.scratch, ignore_errors=True)
    findings = json.loads((staging / mobile.USABILITY[0]).read_text())
    (staging / "README.md").write_text(readme.render(result, findings, job.name))
    result["files"]["README.md"] = file_record(staging, "README.md")
    write_json_atomic(staging / MANIFEST, result)
    return result


def _build_web(job: _Job, library: dict) -> dict:
    folder, manifest, variant = job.folder, job.manifest, job.variant
    staging, progress = job.staging, job.progress
    model_dir = staging / web.MODEL_DIR
    built = web.build(folder, manifest, variant, staging, progress)
    for warning in built.warnings:
        progress(f"warning: {warning}")
    for name in job.copied:
        if name == "config.json":
            web.write_config(folder, model_dir / name, built.details)
        else:
            copy_file(folder / name, model_dir / name)
    progress(f"the page and the library it loads -> index.html, app.js, {web.LIBRARY_DIR}/")
    page = web.write_page(staging, library)
    files = {name: file_record(model_dir, name) for name in [*built.written, *job.copied]}
    versions = {package: about["version"] for package, (_, about) in library.items()}
    details = {
        "source_folder": folder.resolve(),
        **built.details,
        "page": {"files": page, "library": versions},
    }
    result = _manifest(manifest, variant, built.entry, files, "web", job.sources, details)
    write_json_atomic(model_dir / MANIFEST, result)
    if job.check:
        progress(f"checking the pack's answers against variant {variant!r} of the source")
        result["pack"]["check"] = same_answers(folder, variant, model_dir, variant, job.threads)
        progress(same_answers_line(result["pack"]["check"]))
    (staging / "README.md").write_text(readme_web.render(result, job.name))
    write_json_atomic(model_dir / MANIFEST, result)
    return result
