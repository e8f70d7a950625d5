"""`flonnx label --ray` on a local Ray instance (2 CPUs): the same files as the local run, and a
local run that Ray resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_label import (
    ERRORS,
    LABELS,
    QUIET,
    SHARDS,
    TASKS,
    TEXT,
    assert_same_outputs,
    synthetic_folder,
    write_scenes,
)

from flonnx.label import label

SCENES = 24
# Ray 2.60 warns about its own deprecated settings whenever a DataContext is made.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    # "local": a new instance even if another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Scenes, an odd file name, an image that does not decode and a link to nothing (reported)."""
    folder = tmp_path_factory.mktemp("ray_scenes")
    paths = write_scenes(folder, SCENES, seed=5151)
    (folder / "broken.png").write_bytes(paths[1].read_bytes()[:300])
    paths[2].rename(paths[2].with_name("odd name #1%,[x].png"))  # characters URLs and globs treat specially
    (folder / "gone.png").symlink_to(folder / "nothing.png")
    return folder


@pytest.fixture(scope="module")
def local_run(synthetic, scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, progress=QUIET)
    assert (summary.labelled, summary.errors) == (SCENES, 2)
    return out


def test_ray_writes_the_files_of_the_local_run(ray_instance, synthetic, scenes, local_run, tmp_path):
    out = tmp_path / "out"
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, ray=True, batch_size=3, progress=QUIET)
    assert (summary.images, summary.labelled, summary.errors, summary.processed) == (
        SCENES + 2,
        SCENES,
        2,
        SCENES + 2,
    )
    assert_same_outputs(local_run, out)
    errors = {r["path"]: r["error"] for r in map(json.loads, (out / ERRORS).read_text().splitlines())}
    assert errors["gone.png"] == "file not found" and "cannot decode" in errors["broken.png"]
    assert ray_instance.is_initialized()  # a session the caller started is left running


def test_ray_resumes_an_interrupted_local_run(ray_instance, synthetic, scenes, local_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    (out / LABELS).unlink()
    shard = out / SHARDS / "run-0001.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:10]))  # as if killed after 10 images
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, ray=True, progress=QUIET)
    assert (summary.skipped, summary.processed) == (10, SCENES + 2 - 10)
    assert_same_outputs(local_run, out)
    paths = [
        json.loads(line)["path"]
        for s in sorted((out / SHARDS).iterdir())
        for line in s.read_text().splitlines()
    ]
    assert len(paths) == len(set(paths)) == SCENES + 2
