"""`label()`: list SRC, skip what OUT already holds, label the rest locally or on Ray, assemble."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flonnx.runtime.errors import InputError
from flonnx.runtime.prompts import TaskTable
from flonnx.runtime.sessions import physical_cores
from flonnx.runtime.staging import Progress

from .job import Job, coco_tasks, error_record, make_job
from .local import POOLS, Sink, run_local
from .progress import Meter
from .sources import SourceImage, list_images, unreadable
from .writers import OutFolder

DEFAULT_BATCH_SIZE = 4
DEFAULT_POOL = "threads"  # measured: see docs/labeling.md
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class LabelSummary:
    out: Path
    images: int  # in SRC
    labelled: int  # images in labels.jsonl
    errors: int  # images in errors.jsonl
    skipped: int  # done by an earlier run of the same job
    processed: int  # labelled or failed in this run
    seconds: float  # this run's labelling time
    files: tuple[Path, ...]

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def label(
    src: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike,
    tasks: Sequence[str],
    *,
    text: str | None = None,
    region: Sequence[float] | None = None,
    variant: str | Mapping[str, str] | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    column: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    threads: int | None = None,
    pool: str = DEFAULT_POOL,
    ray: bool | str = False,
    retry_errors: bool = False,
    progress: Progress | None = None,
) -> LabelSummary:
    """Label every image of SRC with `model` on `tasks` into OUT, resuming what OUT holds.

    `workers` x `threads` defaults to the machine's cores (locally) or the cluster's CPUs (Ray);
    `ray`: True runs on Ray (a running cluster, else a local instance), a string is the address.
    """
    progress = progress or Progress()
    for name, value in (("batch_size", batch_size), ("workers", workers), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if pool not in POOLS:
        raise InputError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    job, table = make_job(
        src,
        model,
        tasks,
        variant=variant,
        text=text,
        region=region,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    images = list_images(src, column)
    if ray is not False:
        from .ray_job import check_ray

        check_ray(_address(ray))
    with OutFolder.open(out, job) as folder:
        done = folder.records()
        pending = [i for i in images if i.key not in done or (retry_errors and "error" in done[i.key])]
        skipped = len(images) - len(pending)
        progress(f"{len(images)} images in {src}: {skipped} done before, {len(pending)} to label")
        meter = Meter(len(pending), progress)
        started = time.perf_counter()
        with folder.new_shard() as shard:

            def sink(records: Sequence[dict]) -> None:
                shard.write(records)
                meter.update(len(records))

            readable, failed = [], []
            for image in pending:
                reason = unreadable(image.path)
                if reason is None:
                    readable.append(image)
                else:
                    failed.append(error_record(image.key, reason))
            sink(failed)
            if readable:
                options = {"workers": workers, "threads": threads, "batch_size": batch_size}
                _run(job, readable, sink, ray=ray, pool=pool, progress=progress, **options)
        seconds = time.perf_counter() - started
        if pending:
            meter.finish()
        description = f"labels by flonnx label, {Path(job.model).name}"
        files, labelled, errors = folder.assemble(images, _empty_label_names(job, table), description)
    names = ", ".join(f.name for f in files)
    progress(f"{labelled} images labelled, {errors} errors: wrote {names} in {out}")
    return LabelSummary(
        Path(out), len(images), labelled, errors, skipped, len(pending), seconds, tuple(files)
    )


def _run(
    job: Job,
    images: Sequence[SourceImage],
    sink: Sink,
    *,
    ray: bool | str,
    pool: str,
    workers: int | None,
    threads: int | None,
    batch_size: int,
    progress: Progress,
) -> None:
    if ray is not False:
        from .ray_job import run_ray

        threads = threads or DEFAULT_THREADS
        progress(f"on Ray: actors of {threads} CPU{'s' if threads > 1 else ''}, batches of {batch_size}")
        run_ray(
            job, images, sink, address=_address(ray), workers=workers, threads=threads, batch_size=batch_size
        )
        return
    cores = physical_cores()
    threads = threads or (max(1, cores // workers) if workers else DEFAULT_THREADS)
    workers = workers or max(1, cores // threads)
    plural = "s" if threads > 1 else ""
    progress(f"{workers} worker {pool} x {threads} onnxruntime thread{plural}, batches of {batch_size}")
    run_local(job, images, sink, workers=workers, threads=threads, batch_size=batch_size, pool=pool)


def _address(ray: bool | str) -> str | None:
    return None if ray is True else (ray or None)


def _empty_label_names(job: Job, table: TaskTable) -> dict[str, str]:
    """The COCO category of an empty label, per task with boxes or polygons: the text a referring
    segmentation was asked for, else "object"."""
    names = {}
    for task in coco_tasks(job, table):
        text = job.inputs(task, table)[0] if task not in table.region_tasks else None
        names[task] = text or "object"
    return names
