"""The pack folder: built beside OUT as `.OUT.partial-PID` and renamed into place only when
complete, as `flonnx export` writes its folder. A previous OUT (with `--force`) is moved aside as
`.OUT.old-PID` for the instant between the two renames and removed after. A run killed mid-way
leaves only those hidden folders; the next run on the same OUT clears them (and puts back an old
OUT that a kill caught between the renames)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from flonnx.runtime.errors import FlonnxError
from flonnx.runtime.manifest import stale_work


class PackError(FlonnxError):
    """A variant that cannot be packed for the target, or a pack that cannot be written."""


class Progress:
    """One line per stage on stderr, with the seconds elapsed since the pack started."""

    def __init__(self, stream=None, quiet: bool = False):
        self.start = time.perf_counter()
        self.stream = stream  # None: whatever sys.stderr is when a line is written
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            stream = self.stream if self.stream is not None else sys.stderr
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=stream, flush=True)


def check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an OUT that cannot be written, or whose replacement would touch the source folder."""
    resolved, origin = out.resolve(), source.resolve()
    if resolved == origin or resolved in origin.parents or origin in resolved.parents:
        raise PackError(f"the pack {out} must be outside the model folder {source}, and not contain it")
    if out.exists() and not out.is_dir():
        raise PackError(f"the pack {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PackError(f"the pack {out} exists and is not empty; pass --force to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise PackError(f"cannot write the pack {out}: {parent} is not a writable folder")
            break


def recover(out: Path) -> None:
    """Clear what a killed pack left beside OUT."""
    if not out.parent.is_dir():
        return
    for partial in stale_work(out.parent, f".{out.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    for old in stale_work(out.parent, f".{out.name}.old-*"):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def prepare(out: Path) -> Path:
    """A fresh staging folder beside OUT (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise PackError(f"cannot write to {out.parent}: {error.strerror or error}") from None
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
