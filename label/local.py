"""The one-machine backend: `workers` workers with `threads` onnxruntime threads each.

pool="threads": one `Florence2` shared by worker threads (it is immutable and thread-safe;
onnxruntime releases the GIL while a graph runs). pool="processes": one `Florence2` per worker
process. The workers read and label batches; the caller's thread receives each batch's records
and writes them, so there is one writer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from functools import partial

from flonnx.runtime.errors import FlonnxError
from flonnx.runtime.model import Florence2

from .job import Job, label_batch, read_image_bytes
from .sources import SourceImage

POOLS = ("threads", "processes")
Sink = Callable[[Sequence[dict]], None]


def load_model(job: Job, threads: int) -> Florence2:
    return Florence2.load(job.model, variant=job.variant, threads=threads)


def label_images(model: Florence2, job: Job, images: Sequence[SourceImage]) -> list[dict]:
    return label_batch(model, job, [(image.key, read_image_bytes(image.path)) for image in images])


def run_local(
    job: Job,
    images: Sequence[SourceImage],
    sink: Sink,
    *,
    workers: int,
    threads: int,
    batch_size: int,
    pool: str,
) -> None:
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if pool == "threads":
        model = load_model(job, threads)
        with ThreadPoolExecutor(workers, thread_name_prefix="flonnx-label") as executor:
            _drain(executor, partial(label_images, model, job), batches, workers, sink)
    else:
        import multiprocessing

        # spawn: a forked child would inherit the parent's threads and locks in whatever state
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, context, initializer=_start_worker, initargs=(job, threads)
        ) as executor:
            _drain(executor, _label_in_worker, batches, workers, sink)


def _drain(executor: Executor, work: Callable, batches: list, workers: int, sink: Sink) -> None:
    """Keep every worker busy with at most two batches queued each; hand results to `sink` as
    they finish."""
    pending: set[Future] = set()
    queue: Iterator = iter(batches)
    try:
        while True:
            for batch in queue:
                pending.add(executor.submit(work, batch))
                if len(pending) >= 2 * workers:
                    break
            if not pending:
                return
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                sink(future.result())
    except BaseException:
        for future in pending:
            future.cancel()
        raise


# -- worker processes --------------------------------------------------------------------------

_WORKER: tuple[Florence2, Job] | FlonnxError | None = None


def _start_worker(job: Job, threads: int) -> None:
    global _WORKER
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        _WORKER = (load_model(job, threads), job)
    except FlonnxError as error:
        _WORKER = error  # raised by the first batch: the parent reports it as any other error


def _exit_with_parent(parent: int) -> None:
    """A parent killed with SIGKILL cannot stop its pool: a worker left waiting for work would hold
    its model's memory for ever, so it leaves when it finds itself orphaned."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _label_in_worker(images: Sequence[SourceImage]) -> list[dict]:
    if isinstance(_WORKER, FlonnxError):
        raise _WORKER
    assert _WORKER is not None
    model, job = _WORKER
    return label_images(model, job, images)
