"""Writing a whole folder so that readers see the old one or the complete new one, never half.

`flonnx export` and `flonnx pack` build their folder beside OUT as `.OUT.partial-PID` and rename it
into place only when complete; a previous OUT (with `--force`) is moved aside as `.OUT.old-PID`
for the instant between the two renames and removed after. A run killed mid-way leaves only those
hidden folders: `recover` clears them on the next run, and puts back an old OUT that a kill caught
between the renames. Long runs print one `Progress` line per stage.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from .errors import FlonnxError
from .manifest import stale_work


class Progress:
    """One line per stage on stderr, with the seconds elapsed since the run started."""

    def __init__(self, stream=None, quiet: bool = False):
        self.start = time.perf_counter()
        self.stream = stream  # None: whatever sys.stderr is when a line is written
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            stream = self.stream if self.stream is not None else sys.stderr
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=stream, flush=True)


def check_out(out: Path, force: bool, what: str, error: type[FlonnxError]) -> None:
    """Refuse an OUT that cannot be written before any work starts. `what` names it in messages."""
    if out.exists() and not out.is_dir():
        raise error(f"{what} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise error(f"{what} {out} exists and is not empty; pass --force to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"cannot write {what} {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise error(f"cannot write {what} {out}: {parent} is not writable")
            break


def recover(out: Path) -> None:
    """Clear what a killed run left beside OUT (see the module docstring)."""
    if not out.parent.is_dir():
        return
    for partial in stale_work(out.parent, f".{out.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    for old in stale_work(out.parent, f".{out.name}.old-*"):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def prepare(out: Path, error: type[FlonnxError]) -> Path:
    """A fresh staging folder beside OUT (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as failure:
        raise error(f"cannot write to {out.parent}: {failure.strerror or failure}") from None
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
