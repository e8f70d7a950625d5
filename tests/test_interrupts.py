"""Robustness campaign, interrupted writes: `flonnx export` and `flonnx quantize` killed with
SIGKILL at points spread over their run leave the folder as it was or complete, never half
written, and the next run succeeds."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flonnx.runtime.model import Florence2

pytest.importorskip("torch")
pytest.importorskip("onnx")

TRIALS = 4


def _flonnx(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flonnx.runtime.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _duration(*args: str) -> float:
    started = time.perf_counter()
    assert _flonnx(*args).wait() == 0
    return time.perf_counter() - started


def _kill_after(seconds: float, *args: str) -> bool:
    """Run the command and SIGKILL it after `seconds`; True when it was killed before it ended."""
    process = _flonnx(*args)
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _complete(folder: Path, variants=("fp32",)) -> bool:
    """Every file the manifest lists matches it, and each variant loads."""
    for variant in variants:
        Florence2.load(folder, variant=variant, threads=1, verify="sha256")
    return True


def test_killed_export_leaves_the_old_folder_or_a_complete_one(tiny_model_dir, tmp_path):
    out = tmp_path / "export"
    args = ("export", str(tiny_model_dir), str(out), "--image-size", "64", "--quiet", "--force")
    full = _duration(*args)
    before = json.loads((out / "flonnx.json").read_text())["created"]
    killed = 0
    for trial in range(TRIALS):
        killed += _kill_after(full * (trial + 0.5) / TRIALS, *args)
        if out.exists():  # the old export, or the new one: complete either way
            assert _complete(out)
    assert killed >= TRIALS - 1
    assert _duration(*args) > 0  # the next run succeeds, and clears what the killed ones left
    assert _complete(out) and json.loads((out / "flonnx.json").read_text())["created"] >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_killed_quantize_leaves_a_folder_that_verifies(tiny_export_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export_dir, folder)
    args = ("quantize", str(folder), "--recipe", "int8", "--quiet", "--max-new-tokens", "4")
    # Kill points are fractions of the fastest full run so far: on a loaded machine one slow run
    # would otherwise put the later kill points after the end of a normal run.
    fastest = _duration(*args)
    killed = 0
    for trial in range(TRIALS):
        shutil.rmtree(folder)
        shutil.copytree(tiny_export_dir, folder)
        killed += _kill_after(fastest * (trial + 0.5) / TRIALS, *args)
        manifest = json.loads((folder / "flonnx.json").read_text())
        assert _complete(folder, tuple(manifest["variants"]))  # fp32, and int8 when it got listed
        fastest = min(fastest, _duration(*args))  # the next run succeeds
        assert _complete(folder, ("fp32", "int8"))
        assert not list((folder / "onnx").glob(".quantize-*"))
    assert killed >= TRIALS - 1
