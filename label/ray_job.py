"""The Ray Data backend: the same job on a Ray cluster (or a local Ray instance).

`read_binary_files(include_paths=True)` reads the images as bytes (original sizes kept: decoding
happens in `label_batch`, as locally); `map_batches` runs `Labeler`, a callable class holding one
`Florence2` per actor, each actor reserving as many CPUs as its onnxruntime threads. Records
stream back to the driver, which appends them to OUT's shards as the local backend does, so a
Ray run resumes, and assembles, exactly as a local one. Images and the model folder must be at
the same paths on every node (shared storage).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence

from flonnx.runtime.errors import InputError, MissingExtraError

from .job import Job, label_batch
from .local import Sink, load_model
from .sources import SourceImage

CONNECT_TIMEOUT = 10.0  # seconds
MAX_READERS = 16  # concurrent read tasks


class Labeler:
    """One model per actor; a batch of {"bytes", "path"} rows in, one JSON record per row out."""

    def __init__(self, job: Job, threads: int):
        self.job = job
        self.model = load_model(job, threads)

    def __call__(self, batch: dict) -> dict:
        paths = [str(path) for path in batch["path"]]
        records = label_batch(self.model, self.job, list(zip(paths, (bytes(b) for b in batch["bytes"]))))
        # JSON text: answers of different tasks have different shapes, which Arrow columns would refuse
        return {"path": paths, "record": [json.dumps(record) for record in records]}


def _ray():
    try:
        import ray
        import ray.data
    except ModuleNotFoundError:
        raise MissingExtraError("ray", "ray") from None
    return ray


def run_ray(
    job: Job,
    images: Sequence[SourceImage],
    sink: Sink,
    *,
    address: str | None,
    workers: int | None,
    threads: int,
    batch_size: int,
) -> None:
    """Label `images` on Ray. `address`: None connects to a running cluster when there is one
    (RAY_ADDRESS, or the latest `ray start` on this machine) and starts a local instance otherwise;
    "auto", "host:port" and "ray://host:port" as for `ray.init`. A Ray session the caller started
    is reused and left running."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise InputError(
                f"cannot reach a Ray cluster at {address or 'the default address'}: {error}"
            ) from None
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # the driver's own meter reports progress
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = workers or max(1, cpus // threads)
        keys: dict[str, list[str]] = {}  # a list may name one file twice ("a.png", "./a.png")
        for image in images:
            keys.setdefault(_normal(str(image.path)), []).append(image.key)
        # Reading is I/O: read tasks reserve no CPU, so actors holding every CPU cannot starve them;
        # but then nothing bounds how many run at once, and a worker process started per read task
        # delayed the first batch by 30 s on 2 cores (1000 images): so they are bounded here.
        readers = min(actors, MAX_READERS)
        dataset = ray.data.read_binary_files(list(keys), include_paths=True, num_cpus=0, concurrency=readers)
        labelled = dataset.map_batches(
            Labeler,
            fn_constructor_kwargs={"job": job, "threads": threads},
            batch_size=batch_size,
            num_cpus=threads,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_format="numpy",
        )
        for batch in labelled.iter_batches(batch_size=None, batch_format="numpy"):
            records = []
            for path, text in zip(batch["path"], batch["record"]):
                for key in keys[_normal(str(path))]:
                    record = json.loads(text)
                    record["path"] = key
                    records.append(record)
            sink(records)
    finally:
        context.enable_progress_bars = bars
        if started_here:
            ray.shutdown()


def check_ray(address: str | None) -> None:
    """Ray importable, and a cluster address that something answers at: ray.init would retry an
    unreachable one for minutes."""
    _ray()
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected auto, local, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        raise InputError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}") from None


def _normal(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))
