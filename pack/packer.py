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

from . import mobile, readme
from .check import check_line, compare
from .check import passed as check_passed
from .folder import Progress, check_out, copy_file, move_into_place, prepare, recover

TARGETS = {
    "mobile": "ORT-format graphs for ONNX Runtime Mobile (Android, iOS), a reduced-build operator "
    "config, NNAPI/CoreML usability",
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
    def passed(self) -> bool:
        """No check ran, or the pack computed what the source variant computes (see check.py)."""
        return self.check is None or check_passed(self.check)


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
    progress: Progress | None = None,
) -> PackResult:
    """Pack `variant` (default: int8 if listed, else fp32) of the export `folder` for `target` into
    `out` (default: FOLDER-TARGET-VARIANT beside it). `static` fixes the vision encoder's input to
    one image of the model's size; `check` runs the pack against the source variant first."""
    progress = progress or Progress()
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
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
        built = mobile.build(folder, manifest, variant, staging, static, progress)
        for name in copied:
            copy_file(folder / name, staging / name)
        result = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": manifest.get("source", {}),
            "tools": manifest.get("tools", {}),
            "model": manifest.get("model", {}),
            "variants": {variant: built.entry},
            "io": manifest.get("io", {}),
            "files": {name: file_record(staging, name) for name in [*built.written, *copied]},
            "validation": manifest.get("validation"),  # the source export's, against PyTorch
            "pack": {
                "target": target,
                "source": {
                    "folder": str(folder.resolve()),
                    "variant": variant,
                    "files": {name: manifest["files"][name]["sha256"] for name in sources},
                },
                **built.details,
                "tools": _versions(),
                "check": None,
            },
        }
        write_json_atomic(staging / MANIFEST, result)
        if check:
            progress(f"checking the pack's answers against variant {variant!r} of the source")
            converted = built.converted["vision_encoder"]
            result["pack"]["check"] = compare(folder, variant, staging, variant, converted, threads)
            progress(check_line(result["pack"]["check"]))
        shutil.rmtree(built.scratch, ignore_errors=True)
        findings = json.loads((staging / mobile.USABILITY[0]).read_text())
        (staging / "README.md").write_text(readme.render(result, findings, out.name))
        result["files"]["README.md"] = file_record(staging, "README.md")
        write_json_atomic(staging / MANIFEST, result)
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
