"""How much of a request is the runtime's own work (preprocess, prompt, loop, post-process)
rather than time inside onnxruntime sessions.

    python tools/overhead.py EXPORT_FOLDER [--task "<CAPTION>"] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from flonnx.runtime import Florence2, Request


class TimedSession:
    """Wraps an onnxruntime session and adds up the seconds spent in run()."""

    def __init__(self, session, clock: list[float]):
        self._session = session
        self._clock = clock

    def run(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._clock[0] += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(self._session, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--task", default="<CAPTION>")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = Florence2.load(args.folder)
    clock = [0.0]
    model._sessions = {name: TimedSession(s, clock) for name, s in model._sessions.items()}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    shares, totals = [], []
    for _ in range(args.repeats + 1):  # the first run warms up
        clock[0] = 0.0
        started = time.perf_counter()
        (result,) = model.run_batch(
            [Request(image, args.task)], max_new_tokens=args.max_new_tokens, num_beams=1
        )
        total = time.perf_counter() - started
        totals.append(total)
        shares.append((total - clock[0]) / total)
    totals, shares = totals[1:], shares[1:]
    print(
        f"{args.task}: {len(result.tokens) - 1} new tokens, "
        f"end-to-end median {statistics.median(totals):.3f} s; "
        f"outside onnxruntime: median {100 * statistics.median(shares):.2f}% "
        f"(max {100 * max(shares):.2f}%) over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
