"""Constant Reshape shapes where the exporter computes them at run time.

`x.view(batch, length, heads, head_dim)` with `batch, length = x.shape[:2]` exports as
Shape -> Gather -> Unsqueeze (twice) -> Concat -> Reshape: seven small kernels per reshape that
onnxruntime runs at every decoder step. ONNX's Reshape already copies a dimension from its input
where the shape says 0, so a shape entry that is "dimension k of the tensor being reshaped, at
position k" becomes the constant 0, and a shape made only of such entries and constants becomes
one initializer. The chains left without readers are removed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

_CHAIN_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Constant"}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _own_dimension(part: str, data: str, producers: dict, constants: dict) -> int | None:
    """k when `part` is Unsqueeze(Gather(Shape(data), k), axes=[0]), else None."""
    unsqueeze = producers.get(part)
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) != 2:
        return None
    axes = constants.get(unsqueeze.input[1])
    gather = producers.get(unsqueeze.input[0])
    if axes is None or axes.tolist() != [0] or gather is None or gather.op_type != "Gather":
        return None
    index = constants.get(gather.input[1])
    shape = producers.get(gather.input[0])
    if index is None or index.ndim != 0 or _attribute(gather, "axis", 0) != 0:
        return None
    if shape is None or shape.op_type != "Shape" or shape.input[0] != data or shape.attribute:
        return None
    return int(index)


def fold_reshape_shapes(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every Reshape whose shape can be constant; returns how many were."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    constants = _constants(graph)
    folded = 0
    for node in graph.node:
        if node.op_type != "Reshape" or _attribute(node, "allowzero", 0):
            continue
        concat = producers.get(node.input[1])
        if concat is None or concat.op_type != "Concat":
            continue
        values: list[int] = []
        for part in concat.input:
            constant = constants.get(part)
            if constant is not None and constant.ndim == 1 and constant.dtype == np.int64:
                values += constant.tolist()
            elif _own_dimension(part, node.input[0], producers, constants) == len(values):
                values.append(0)
            else:
                break
        else:
            name = f"{node.output[0]}/shape"
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
            node.input[1] = name
            folded += 1
    _remove_dead_chains(graph)
    return folded


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's nodes read, subgraphs included (they may read outer values)."""
    read = {v.name for v in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                read |= _read_names(sub)
    return read


def _remove_dead_chains(graph: onnx.GraphProto) -> None:
    while True:
        read = _read_names(graph)
        kept = [
            node
            for node in graph.node
            if node.op_type not in _CHAIN_OPS or any(output in read for output in node.output)
        ]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def fold_weight_identities(model: onnx.ModelProto) -> int:
    """Read weights directly where the exporter put an Identity in between; returns how many.

    The TorchScript exporter gives a weight used more than once (the vision MLP's bands, see
    graphs.py) one Identity per extra use, and the int8 quantizer only quantizes a MatMul whose
    weight is an initializer: behind an Identity, those MatMuls stayed fp32.
    """
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    aliases = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity" and node.input[0] in weights and node.output[0] not in outputs
    }
    if not aliases:
        return 0
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in aliases)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)
    return len(aliases)
