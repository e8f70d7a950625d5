"""runtime/sessions.py and the concurrent session load: the shared CPU arena, errors and threads.

Small hand-built graphs, no model: these run without the export extra (onnx builds the graphs).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from flonnx.runtime import sessions as sessions_module  # noqa: E402
from flonnx.runtime.errors import ModelFolderError  # noqa: E402
from flonnx.runtime.model import open_sessions  # noqa: E402
from flonnx.runtime.sessions import create_session, open_session, share_cpu_arena  # noqa: E402


def write_matmul(path: Path, seed: int, width: int = 64) -> np.ndarray:
    """y = relu(x @ W): a graph whose activations go through the arena; returns W."""
    weight = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return weight


def config_entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # onnxruntime raises for a key never set
        return None


def test_every_session_uses_the_process_arena(tmp_path: Path) -> None:
    write_matmul(tmp_path / "a.onnx", 0)
    share_cpu_arena()
    share_cpu_arena()  # registering twice would raise inside onnxruntime
    session = create_session(tmp_path / "a.onnx", 1, ["CPUExecutionProvider"])
    assert config_entry(session, "session.use_env_allocators") == "1"
    assert sessions_module._arena_registered


def test_sessions_sharing_the_arena_run_from_many_threads(tmp_path: Path) -> None:
    weights = [write_matmul(tmp_path / f"{i}.onnx", i) for i in range(3)]
    opened = [open_session(tmp_path / f"{i}.onnx", 1, ["CPUExecutionProvider"])[0] for i in range(3)]
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(20):
            index = int(rng.integers(3))
            x = rng.standard_normal((int(rng.integers(1, 300)), 64)).astype(np.float32)
            (y,) = opened[index].run(None, {"x": x})
            if not np.allclose(y, np.maximum(x @ weights[index], 0), atol=1e-4):
                failures.append(f"thread {seed}, graph {index}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_concurrent_load_opens_every_component(tmp_path: Path) -> None:
    files = {name: f"{name}.onnx" for name in ("vision_encoder", "decoder_model_merged", "encoder_model")}
    for seed, name in enumerate(files):
        write_matmul(tmp_path / files[name], seed)
    opened = open_sessions(tmp_path, files, 1, ["CPUExecutionProvider"])
    assert list(opened) == ["decoder_model_merged", "vision_encoder", "encoder_model"]
    spinning = {name: config_entry(s, "session.intra_op.allow_spinning") for name, s in opened.items()}
    assert spinning == {"decoder_model_merged": None, "vision_encoder": "0", "encoder_model": "0"}


def test_concurrent_load_raises_the_typed_error_naming_the_file(tmp_path: Path) -> None:
    files = {name: f"{name}.onnx" for name in ("vision_encoder", "encoder_model", "decoder_model_merged")}
    write_matmul(tmp_path / files["vision_encoder"], 0)
    write_matmul(tmp_path / files["decoder_model_merged"], 1)
    (tmp_path / files["encoder_model"]).write_bytes(b"not a graph")
    with pytest.raises(ModelFolderError, match=r"encoder_model\.onnx"):
        open_sessions(tmp_path, files, 1, ["CPUExecutionProvider"])
