"""`ServeSettings`: every limit and knob of the server, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flonnx.runtime.errors import InputError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _number(name: str, value, minimum: float, inclusive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (not inclusive and value == minimum):
        rule = f">= {minimum}" if inclusive else f"> {minimum}"
        raise InputError(f"{name} must be a number {rule}, got {value!r}")


@dataclass(frozen=True)
class ServeSettings:
    """Defaults suit one 2-8 core machine serving base or large; raise the limits deliberately."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Batching: rows (one image x one task) that arrive within `batch_window_ms` of the first
    # waiting row, or of the end of the previous batch, run together, at most `max_batch` rows.
    batch_window_ms: float = 10.0
    max_batch: int = 8
    # Backpressure: rows waiting to run; a request that does not fit gets 503 + Retry-After (one
    # with more rows than the whole queue gets 413).
    queue_size: int = 64
    # Seconds from arrival to answer; past it the request gets 504 and its waiting rows are dropped.
    deadline_s: float = 120.0
    max_upload_bytes: int = 20 * 1024 * 1024  # the request body, whatever its encoding
    max_pixels: int = 40_000_000  # per image, read from its header before decoding
    max_images: int = 16  # per request
    max_tasks: int = 16  # per request
    max_new_tokens: int = 1024  # cap on the option; also the default when the model's is larger
    max_num_beams: int = 4
    # Images per vision encoder run. Base int8, 2 threads: 1.9-2.4 s/image and 0.7 GB peak RSS at
    # 1, 2.5-2.6 s/image and 3.1 GB at 8 (the encoder is compute-bound; batching it buys nothing).
    vision_batch: int = 1
    cache_mb: float = 256.0  # image-feature cache; 0 turns it off (base: 1.8 MB per image)
    drain_timeout_s: float = 30.0  # graceful shutdown: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InputError(f"host must be a host name or address, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise InputError(f"port must be an integer in 0..65535 (0: any free port), got {self.port!r}")
        for name in (
            "max_batch",
            "queue_size",
            "max_upload_bytes",
            "max_pixels",
            "max_images",
            "max_tasks",
            "vision_batch",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("max_num_beams", self.max_num_beams)
        _number("batch_window_ms", self.batch_window_ms, 0.0, inclusive=True)
        _number("deadline_s", self.deadline_s, 0.0, inclusive=False)
        _number("cache_mb", self.cache_mb, 0.0, inclusive=True)
        _number("drain_timeout_s", self.drain_timeout_s, 0.0, inclusive=True)

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def limits(self) -> dict:
        """What clients may send, for GET /v1/info."""
        names = (
            "max_upload_bytes",
            "max_pixels",
            "max_images",
            "max_tasks",
            "max_new_tokens",
            "max_num_beams",
        )
        values = asdict(self)
        return {
            **{name: values[name] for name in names},
            "queue_size": self.queue_size,
            "max_batch": self.max_batch,
            "batch_window_ms": self.batch_window_ms,
            "deadline_s": self.deadline_s,
        }
