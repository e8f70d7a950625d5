"""Window batching on one worker thread: rows that arrive close together run as one batch.

A row is one unit of work (here: one image x one task) with a key; only rows with equal keys
share a batch (they must share the decoding options). The worker takes the oldest waiting row and
starts a batch when `max_batch` rows of its key wait, or else when all of these hold:
- `window_s` has passed since that row arrived;
- the worker has settled after its previous batch: `window_s`, or 1% of that batch's duration if
  longer (at most 0.25 s);
- no request is still being read and checked (`incoming()`), or `HOLD_S` more has passed.

Why the last two: under a closed loop (N clients that send again as soon as they are answered) a
batch of 3 and a batch of 5 otherwise keep alternating forever, because the answered clients come
back a few ms after the worker has started on the rows that waited. On base int8 with 8 clients
on a loaded 2-core machine that split cost 28% of the throughput (3 batches for 16 requests). The
settle time lets them rejoin for at most 1% of the throughput, and a request whose body is still
being decoded is waited for instead of being left for the next batch.

Each row carries a `concurrent.futures.Future`. The worker calls `set_running_or_notify_cancel`
when it takes a row, so a row whose caller gave up (deadline, disconnect) before it ran is skipped,
and a running row can no longer be cancelled: exactly one of result, exception or cancellation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flonnx.serve")
HOLD_S = 0.1  # longest a batch waits for requests that are still being read and checked
SETTLE_FRACTION = 0.01
SETTLE_MAX_S = 0.25


class QueueFull(Exception):
    """The queue has no room for the rows: come back later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new rows."""


@dataclass(eq=False)
class Row:
    key: Hashable  # rows batch together only with rows of the same key
    payload: Any
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        process: Callable[[list[Row]], None],
        *,
        window_s: float,
        max_batch: int,
        queue_size: int,
        on_depth: Callable[[int], None] | None = None,
    ):
        self._process = process
        self.window_s = window_s
        self.max_batch = max_batch
        self.queue_size = queue_size
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: deque[Row] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._ready_at = 0.0  # when the last batch ended
        self._last_batch_s = 0.0
        self._incoming = 0
        self._thread: threading.Thread | None = None
        self.busy = False

    # -- callers ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flonnx-batcher", daemon=True)
            self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Hold this while reading and checking a request that will be submitted: a batch that is
        not full waits for it (at most HOLD_S past its window)."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    def submit(self, rows: list[Row]) -> None:
        """Queue all of `rows` or none: raises QueueFull or Closed."""
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) + len(rows) > self.queue_size:
                raise QueueFull(f"{len(self._queue)} rows are waiting; the queue holds {self.queue_size}")
            self._queue.extend(rows)
            self._cond.notify()
            self._on_depth(len(self._queue))
        for row in rows:
            row.future.add_done_callback(self._forget_if_cancelled)

    def _forget_if_cancelled(self, future: Future) -> None:
        """A caller gave up on a queued row: free its place now, not when the worker reaches it."""
        if future.cancelled():
            with self._cond:
                self._queue = deque(row for row in self._queue if not row.future.cancelled())
                self._on_depth(len(self._queue))

    def close(self, timeout: float | None = None) -> bool:
        """Take no new rows, run the queued ones, stop. True when the worker finished in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            running = [row for row in batch if row.future.set_running_or_notify_cancel()]
            started = time.monotonic()
            if running:
                self.busy = True
                try:
                    self._process(running)
                except Exception as error:  # a bug in process: fail its rows, keep serving
                    log.exception("batch of %d rows failed", len(running))
                    for row in running:
                        if not row.future.done():
                            row.future.set_exception(error)
                finally:
                    self.busy = False
                for row in running:
                    if not row.future.done():
                        row.future.set_exception(RuntimeError("the batch gave this row no result"))
            with self._cond:
                self._ready_at = time.monotonic()
                if running:
                    self._last_batch_s = self._ready_at - started

    def _next_batch(self) -> list[Row] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                if self._queue:
                    break
                self._on_depth(0)
                if self._closing:
                    return None
                self._cond.wait()
            key = self._queue[0].key
            settle = max(self.window_s, min(SETTLE_FRACTION * self._last_batch_s, SETTLE_MAX_S))
            start_by = max(self._queue[0].arrived + self.window_s, self._ready_at + settle)
            hold_until = start_by + HOLD_S
            while not self._closing and self._count(key) < self.max_batch:
                now = time.monotonic()
                if now >= start_by and (not self._incoming or now >= hold_until):
                    break
                self._cond.wait((start_by if now < start_by else hold_until) - now)
            batch, rest = [], deque()
            for row in self._queue:
                if row.future.cancelled():
                    continue
                if row.key == key and len(batch) < self.max_batch:
                    batch.append(row)
                else:
                    rest.append(row)
            self._queue = rest
            self._on_depth(len(rest))
            return batch

    def _count(self, key: Hashable) -> int:
        return sum(1 for row in self._queue if row.key == key and not row.future.cancelled())
