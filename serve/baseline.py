"""In-process `Florence2.run_batch` on the load test's images: what the server is compared with."""

from __future__ import annotations

import statistics
import time

from .loadtest import LoadPlan, make_images


def baseline(folder: str, plan: LoadPlan, variant, threads: int | None, batch: int, repeats: int) -> dict:
    """images/s of Florence2.run_batch on batches of `batch` distinct images, in this process."""
    from flonnx.runtime import Florence2, Request

    model = Florence2.load(folder, variant=variant, threads=threads)
    images = make_images(plan, batch * (repeats + 1))
    options = {k: v for k, v in plan.options.items() if k != "timeout_s"}
    options.setdefault("max_new_tokens", None)

    def run(chunk: list[bytes]) -> float:
        requests = [Request(image, task, plan.text) for image in chunk for task in plan.tasks]
        started = time.perf_counter()
        model.run_batch(requests, **options)
        return time.perf_counter() - started

    run(images[:batch])  # warm-up
    seconds = [run(images[batch * (i + 1) : batch * (i + 2)]) for i in range(repeats)]
    return {
        "batch": batch,
        "repeats": repeats,
        "seconds": [round(s, 3) for s in seconds],
        "images_per_s": round(batch / statistics.median(seconds), 4),
    }
