"""The pack folder, written as `flonnx export` writes its folder (flonnx.runtime.staging): built
beside OUT and renamed into place only when complete; what a killed run left is cleared by the next."""

from __future__ import annotations

import shutil
from pathlib import Path

from flonnx.runtime.errors import FlonnxError
from flonnx.runtime.staging import Progress, move_into_place, recover  # noqa: F401 (pack's API)
from flonnx.runtime.staging import check_out as check_writable
from flonnx.runtime.staging import prepare as prepare_staging


class PackError(FlonnxError):
    """A variant that cannot be packed for the target, or a pack that cannot be written."""


def check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an OUT that cannot be written, or whose replacement would touch the source folder."""
    resolved, origin = out.resolve(), source.resolve()
    if resolved == origin or resolved in origin.parents or origin in resolved.parents:
        raise PackError(f"the pack {out} must be outside the model folder {source}, and not contain it")
    check_writable(out, force, "the pack", PackError)


def prepare(out: Path) -> Path:
    return prepare_staging(out, PackError)


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
