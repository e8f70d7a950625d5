"""The serving core: one model, its batcher, the feature cache and the metrics.

The FastAPI app (app.py) runs its requests through an `Engine`; the Ray Serve deployment
(ray_app.py) serves that same app in each replica. A job of I images x T tasks becomes I*T rows;
rows of several requests run through `Florence2.run_batch` together, with every distinct image
encoded once per batch, or not at all when its features are cached.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass

from flonnx.runtime import Florence2, Request
from flonnx.runtime.errors import FlonnxError, ImageError, InputError

from .batcher import Batcher, Closed, QueueFull, Row
from .cache import FeatureCache
from .inputs import DecodedImage, Job, RawJob, ServeError, TaskSpec, prepare
from .metrics import ServeMetrics
from .settings import ServeSettings

log = logging.getLogger("flonnx.serve")
STAGES = ("preprocess", "vision", "prompt", "encoder", "decode", "postprocess")


@dataclass(frozen=True)
class RowWork:
    image: DecodedImage
    spec: TaskSpec
    options: dict


@dataclass(frozen=True)
class RowOutcome:
    answer: dict  # {task: answer}, what Florence2.run returns
    batch: int  # which batch ran it
    batch_size: int
    queue_s: float
    batch_s: float
    cached: bool  # its image features came from the cache
    stages: dict


def status_of(error: BaseException) -> int:
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, ImageError):
        return 400
    if isinstance(error, InputError):
        return 422
    return 500


def message_of(error: BaseException) -> str:
    if isinstance(error, ServeError):
        return error.message
    if isinstance(error, FlonnxError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


class Engine:
    def __init__(self, model: Florence2, settings: ServeSettings, metrics: ServeMetrics | None = None):
        self.model = model
        self.settings = settings
        self.metrics = metrics or ServeMetrics(settings.max_batch)
        max_bytes = int(settings.cache_mb * 1024 * 1024)
        self.cache = FeatureCache(max_bytes) if max_bytes > 0 else None
        self.batcher = Batcher(
            self._process,
            window_s=settings.batch_window_ms / 1000,
            max_batch=settings.max_batch,
            queue_size=settings.queue_size,
            on_depth=self.metrics.queue_depth.set,
        )
        self.closing = False
        self._batches = 0
        self._batch_seconds = 0.0  # moving average, for Retry-After

    def start(self) -> None:
        self.batcher.start()

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish the queued ones; True when done within `timeout`."""
        self.closing = True
        return self.batcher.close(timeout)

    @property
    def healthy(self) -> bool:
        return self.batcher.alive and not self.closing

    def prepare(self, raw: RawJob) -> Job:
        return prepare(self.model, self.settings, raw)

    def submit(self, job: Job) -> list[Future]:
        """Queue the job's rows (image-major); one future per row. Raises ServeError 503 when full."""
        # Sampled rows get a key of their own: their random streams depend on their batch.
        key = (job.options, object()) if job.sampled else job.options
        options = dict(job.options)
        rows = [Row(key, RowWork(image, spec, options)) for image in job.images for spec in job.tasks]
        try:
            self.batcher.submit(rows)
        except QueueFull as error:
            wait = self.retry_after()
            raise ServeError(
                503, f"the server is busy ({error}); retry in {wait} s", {"Retry-After": str(wait)}
            ) from None
        except Closed:
            wait = str(self.retry_after())
            raise ServeError(503, "the server is shutting down", {"Retry-After": wait}) from None
        return [row.future for row in rows]

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved: the waiting batches at the recent batch time."""
        batches = math.ceil(self.batcher.depth / self.settings.max_batch) + 1
        return max(1, math.ceil(batches * self._batch_seconds))

    def respond(self, job: Job, outcomes: list[RowOutcome], total_s: float) -> dict:
        tasks = len(job.tasks)
        results = [[o.answer for o in outcomes[i : i + tasks]] for i in range(0, len(outcomes), tasks)]
        batches = {o.batch: o for o in outcomes}.values()
        stages: dict[str, float] = {}
        for outcome in batches:
            for name, seconds in outcome.stages.items():
                stages[name] = round(stages.get(name, 0.0) + seconds, 4)
        timings = {
            "total_s": round(total_s, 4),
            "queue_s": round(max(o.queue_s for o in outcomes), 4),
            "run_s": round(sum(o.batch_s for o in batches), 4),
            "batch_size": max(o.batch_size for o in outcomes),
            # images that did not go through the vision encoder for this request
            "cached_images": sum(outcomes[i * tasks].cached for i in range(len(job.images))),
            **stages,
        }
        return {"results": results, "timings": timings}

    # -- the worker thread ------------------------------------------------------------------

    def _process(self, rows: list[Row]) -> None:
        try:
            self._run(rows)
        except FlonnxError as error:
            if len(rows) == 1:
                rows[0].future.set_exception(error)
                return
            # One bad row must not fail the others: run them one by one.
            log.warning("batch of %d failed (%s); running its rows alone", len(rows), error)
            for row in rows:
                try:
                    self._run([row])
                except Exception as alone:  # noqa: BLE001 - goes to that row's caller
                    row.future.set_exception(alone)

    def _run(self, rows: list[Row]) -> None:
        started = time.monotonic()
        self._batches += 1
        batch = self._batches
        for row in rows:
            self.metrics.queue_seconds.observe(started - row.arrived)
        timings: dict = {}
        features, cached = self._features([row.payload.image for row in rows], timings)
        requests = [
            Request(
                features[row.payload.image.key],
                row.payload.spec.task,
                row.payload.spec.text,
                row.payload.spec.region,
            )
            for row in rows
        ]
        results = self.model.run_batch(requests, timings=timings, **rows[0].payload.options)
        elapsed = time.monotonic() - started
        self._batch_seconds = elapsed if batch == 1 else 0.8 * self._batch_seconds + 0.2 * elapsed
        tokens = sum(len(result.tokens) - 1 for result in results)
        self.metrics.batch_size.observe(len(rows))
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.tokens.inc(tokens)
        if timings.get("decode"):
            self.metrics.tokens_per_s.set(tokens / timings["decode"])
        stages = {name: timings[name] for name in STAGES if name in timings}
        for row, result in zip(rows, results):
            row.future.set_result(
                RowOutcome(
                    answer=result.as_dict(),
                    batch=batch,
                    batch_size=len(rows),
                    queue_s=started - row.arrived,
                    batch_s=elapsed,
                    cached=row.payload.image.key in cached,
                    stages=stages,
                )
            )

    def _features(self, images: list[DecodedImage], timings: dict) -> tuple[dict, set[str]]:
        """Features of each distinct image: from the cache, else encoded `vision_batch` at a time."""
        features, missing, cached = {}, {}, set()
        for image in images:
            if image.key in features or image.key in missing:
                continue
            hit = self.cache.get(image.key) if self.cache is not None else None
            if hit is not None:
                features[image.key] = hit
                cached.add(image.key)
            else:
                missing[image.key] = image.image
        if self.cache is not None:
            self.metrics.cache.labels("hit").inc(len(cached))
            self.metrics.cache.labels("miss").inc(len(missing))
        if missing:
            pending, step = list(missing.values()), self.settings.vision_batch
            encoded = [
                item
                for i in range(0, len(pending), step)
                for item in self.model.encode_images(pending[i : i + step], timings)
            ]
            self.metrics.images_encoded.inc(len(missing))
            for key, item in zip(missing, encoded):
                features[key] = item
                if self.cache is not None:
                    self.cache.put(key, item)
            if self.cache is not None:
                self.metrics.cache_bytes.set(self.cache.nbytes)
        return features, cached
