"""The one place where onnxruntime sessions are created."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InputError, ModelFolderError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def physical_cores() -> int:
    """Physical cores where Linux tells them, else logical CPUs available to this process."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores = set()
    physical = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
            cores.add((physical, core))
    return max(1, min(logical, len(cores))) if cores else logical


def check_providers(providers: list[str] | tuple[str, ...] | None) -> list[str]:
    available = ort.get_available_providers()
    if providers is None:
        return list(DEFAULT_PROVIDERS)
    providers = [providers] if isinstance(providers, str) else list(providers)
    if not providers:
        raise InputError(f"providers must not be empty; available: {', '.join(available)}")
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise InputError(
            f"execution provider {', '.join(unknown)} is not available; available: {', '.join(available)}"
        )
    return providers


_arena_lock = threading.Lock()
_arena_registered = False


def share_cpu_arena() -> None:
    """Register, once per process, the CPU arena that every session created here allocates from.

    Each session otherwise grows an arena of its own, and what one session freed after its run
    (the vision encoder's activations) stays reserved while the next one (the text encoder, then
    the decoder) grows its own: base int8, two captions, peaks at 836 MB with an arena per session
    and 738-747 MB with one shared arena, at no measured cost in time. onnxruntime keeps
    environment allocators per process, so several models in one process share the arena too;
    the arena is thread-safe.

    The arena grows by what is asked (kSameAsRequested), not by the next power of two: the
    rounding left 30 MB of touched but unused arena (banded base int8, 611-621 -> 581-591 MB over
    2-6 captions; caption time equal within noise, 0.93-1.01x in six alternating pairs).
    """
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # No limit, kSameAsRequested, default initial chunk and dead bytes per chunk.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _arena_registered = True


def session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False`: idle worker threads sleep at once instead of spinning for the next run."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The memory pattern plans one block per input shape and keeps the last run's block alive
    # beside the next: off, base int8 peaks at 844 MiB instead of 1174 over five captions, at no
    # measured cost. (Releasing the arena after the encoder runs saves ~60 MiB more but costs
    # 10-25% of a caption: not taken.)
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Prepacked weights stay: without them (session.disable_prepacking) base int8 holds 174 MB
    # after loading instead of 402, but peaks at 825-851 MB instead of 635 (the kernels pack per
    # run) and its vision encoder runs slower.
    options.log_severity_level = 3
    return options


def open_session(
    path: Path, threads: int, providers: list[str], spinning: bool = True
) -> tuple[ort.InferenceSession | HalfPrecisionSession, list[str]]:
    """The session, and the requested providers it does not use. Emits no warning, so that it
    can run in a worker thread (`Florence2.load` opens its graphs concurrently)."""
    share_cpu_arena()
    options = session_options(threads, spinning)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFolderError(
            f"onnxruntime cannot load {path}: {first_line} (check the folder with verify='sha256')"
        ) from None
    used = session.get_providers()
    if any(item.type == "tensor(float16)" for item in [*session.get_inputs(), *session.get_outputs()]):
        session = HalfPrecisionSession(session)
    return session, [p for p in providers if p not in used]


def warn_fallen(path: Path, fallen: list[str], used: list[str], stacklevel: int = 3) -> None:
    if fallen:
        warnings.warn(
            f"{path.name}: provider {', '.join(fallen)} was requested but not used ({', '.join(used)} is)",
            stacklevel=stacklevel,
        )


def create_session(
    path: Path, threads: int, providers: list[str], spinning: bool = True
) -> ort.InferenceSession | HalfPrecisionSession:
    """`spinning=False`: idle worker threads sleep at once instead of spinning for the next run."""
    session, fallen = open_session(path, threads, providers, spinning)
    warn_fallen(path, fallen, session.get_providers(), stacklevel=3)
    return session


class HalfPrecisionSession:
    """A session whose graph takes or returns float16 (fp16 graphs converted without
    `keep_io_types`): float32 inputs are cast to what the graph declares, and float16 outputs come
    back as float32, except the decoder's `present.*` cache, which goes back in as it came out."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self._half_inputs = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
        self._outputs = [o.name for o in session.get_outputs()]
        self._widen = {
            o.name
            for o in session.get_outputs()
            if o.type == "tensor(float16)" and not o.name.startswith("present")
        }

    def run(self, output_names, feed: dict, run_options=None) -> list:
        half = self._half_inputs
        feed = {
            name: value.astype(np.float16) if name in half and value.dtype == np.float32 else value
            for name, value in feed.items()
        }
        names = output_names or self._outputs
        outputs = self.session.run(names, feed, run_options)
        return [out.astype(np.float32) if name in self._widen else out for name, out in zip(names, outputs)]

    def __getattr__(self, name: str):  # get_inputs, get_outputs, get_providers, ...
        return getattr(self.session, name)
