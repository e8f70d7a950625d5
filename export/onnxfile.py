"""Writing a graph with its weights beside it: the layout onnxruntime can memory-map.

Torch-free, so the quantize stage can use it too.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data

PAGE = 4096
MIN_EXTERNAL_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` and its weights to `path.name + ".data"`, each on a page boundary.

    onnxruntime maps external weights from the file instead of copying them out of a parsed
    protobuf: base fp32 holds 1020 MiB after load instead of 1470. There is no 2 GB limit on the
    data file. `model` is changed: its weights then point into the file.
    """
    path = Path(path)
    location = path.name + ".data"
    offset = 0
    with open(path.with_name(location), "wb") as data:
        for graph in _graphs(model.graph):
            for tensor in graph.initializer:
                if tensor.data_type == TensorProto.STRING or tensor.data_location == TensorProto.EXTERNAL:
                    continue
                if not tensor.HasField("raw_data"):  # typed fields (float_data, ...) -> raw bytes
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                raw = tensor.raw_data
                if len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                padding = -offset % PAGE
                data.write(bytes(padding))
                offset += padding
                data.write(raw)
                set_external_data(tensor, location, offset=offset, length=len(raw))
                tensor.data_location = TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                offset += len(raw)
    onnx.save_model(model, str(path))
