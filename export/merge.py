"""Join the first-step and later-step decoders into one graph with an `If` node.

The recipe is optimum's `merge_decoders`: `use_cache_branch` selects the with-past graph
(`then`) or the no-past graph (`else`); weights both graphs hold are stored once in the outer
graph; the with-past branch returns empty tensors in place of the encoder K/V it does not
compute, so both branches have the same outputs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

USE_CACHE_BRANCH = "use_cache_branch"


def _content_key(tensor: TensorProto) -> tuple:
    array = numpy_helper.to_array(tensor)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(array.tobytes()).hexdigest()


def _stays_in_branch(tensor: TensorProto) -> bool:
    # ORT fails after graph optimization when scalar or 1-D int initializers move to the outer graph.
    is_int = tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
    return len(tensor.dims) == 0 or (len(tensor.dims) == 1 and is_int)


def _rename_in_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_in_graph(attribute.g, mapping)
    for value in [*graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)


def _branch(
    model: onnx.ModelProto, prefix: str, shared: dict[tuple, str], keys: dict[str, tuple]
) -> onnx.GraphProto:
    """The model's graph as an `If` branch: no inputs, shared weights read from the outer scope."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.name = prefix.rstrip("/")
    outer = {value.name for value in graph.input}
    mapping: dict[str, str] = {}
    for tensor in graph.initializer:
        mapping[tensor.name] = shared.get(keys[tensor.name]) or prefix + tensor.name
    for node in graph.node:
        for name in node.output:
            if name and name not in outer:
                mapping.setdefault(name, prefix + name)
    output_names = [value.name for value in graph.output]
    _rename_in_graph(graph, mapping)
    for node in graph.node:
        node.name = prefix + node.name
    kept = [tensor for tensor in graph.initializer if tensor.name.startswith(prefix)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.input[:]
    del graph.value_info[:]
    # Branch outputs keep their element type only: the two branches differ in some dimensions.
    for value, original in zip(graph.output, output_names):
        elem_type = value.type.tensor_type.elem_type
        value.CopyFrom(helper.make_tensor_value_info(mapping.get(original, original), elem_type, None))
    return graph


def _add_empty_outputs(
    graph: onnx.GraphProto, names: list[str], heads: int, head_dim: int, prefix: str
) -> None:
    for name in names:
        constant = prefix + name + "/empty"
        empty = numpy_helper.from_array(np.zeros((0, heads, 0, head_dim), np.float32), constant + "/value")
        graph.node.append(helper.make_node("Constant", [], [constant], value=empty, name=constant))
        graph.output.append(helper.make_tensor_value_info(constant, TensorProto.FLOAT, None))


def merge_decoders(no_past: onnx.ModelProto, with_past: onnx.ModelProto, heads: int, head_dim: int):
    """One decoder graph whose inputs are the union of both, plus `use_cache_branch` (bool[1])."""
    opsets = {(o.domain, o.version) for o in no_past.opset_import}
    if opsets != {(o.domain, o.version) for o in with_past.opset_import}:
        raise ValueError("the two decoder graphs were exported with different opsets")

    # Hashing the weights is most of the merge's time: each tensor is hashed once.
    keys_no_past = {t.name: _content_key(t) for t in no_past.graph.initializer}
    keys_with_past = {t.name: _content_key(t) for t in with_past.graph.initializer}
    movable_with_past = {
        keys_with_past[t.name] for t in with_past.graph.initializer if not _stays_in_branch(t)
    }
    shared_tensors: dict[tuple, TensorProto] = {}
    shared: dict[tuple, str] = {}
    for tensor in no_past.graph.initializer:
        key = keys_no_past[tensor.name]
        if key in movable_with_past and key not in shared and not _stays_in_branch(tensor):
            shared[key] = f"shared/{tensor.name}"
            shared_tensors[key] = tensor

    else_branch = _branch(no_past, "no_past/", shared, keys_no_past)
    then_branch = _branch(with_past, "with_past/", shared, keys_with_past)
    present_names = [value.name for value in no_past.graph.output]
    with_past_outputs = {value.name for value in with_past.graph.output}
    missing = [name for name in present_names if name not in with_past_outputs]
    _add_empty_outputs(then_branch, missing, heads, head_dim, "with_past/")
    order = {name: i for i, name in enumerate(present_names)}
    given = [value.name.removeprefix("with_past/").removesuffix("/empty") for value in then_branch.output]
    outputs = sorted(zip(given, list(then_branch.output)), key=lambda pair: order[pair[0]])
    del then_branch.output[:]
    then_branch.output.extend(value for _, value in outputs)

    inputs = {value.name: value for value in no_past.graph.input}
    for value in with_past.graph.input:
        inputs.setdefault(value.name, value)
    cond = helper.make_tensor_value_info(USE_CACHE_BRANCH, TensorProto.BOOL, [1])
    node = helper.make_node(
        "If",
        [USE_CACHE_BRANCH],
        present_names,
        then_branch=then_branch,
        else_branch=else_branch,
        name="If_cache",
    )
    outer_outputs = []
    for value in no_past.graph.output:
        if value.name in missing:
            # Encoder K/V: real at step 0, empty afterwards, so no fixed dimension names.
            outer_outputs.append(helper.make_tensor_value_info(value.name, TensorProto.FLOAT, [None] * 4))
        else:
            outer_outputs.append(value)
    graph = helper.make_graph(
        [node],
        "decoder_model_merged",
        [*inputs.values(), cond],
        outer_outputs,
        initializer=[_renamed(tensor, shared[key]) for key, tensor in shared_tensors.items()],
    )
    merged = helper.make_model(graph, opset_imports=list(no_past.opset_import), producer_name="flonnx")
    merged.ir_version = no_past.ir_version
    return merged


def _renamed(tensor: TensorProto, name: str) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy
