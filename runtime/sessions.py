"""The one place where onnxruntime sessions are created."""

from __future__ import annotations

import os
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


def create_session(
    path: Path, threads: int, providers: list[str], spinning: bool = True
) -> ort.InferenceSession:
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
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
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
    fallen = [p for p in providers if p not in used]
    if fallen:
        warnings.warn(
            f"{path.name}: provider {', '.join(fallen)} was requested but not used ({', '.join(used)} is)",
            stacklevel=3,
        )
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
