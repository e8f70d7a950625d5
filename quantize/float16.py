"""float16 graphs with float32 inputs and outputs, for GPUs and WebGPU (transformers.js `_fp16`).

onnxruntime's converter (`onnxruntime.transformers.float16.convert_float_to_float16`) does the
conversion, with `keep_io_types` (a Cast after each float input and before each float output, as
onnx-community's files have) and an op block list. Three repairs follow, because the converter
writes every Cast it adds into the outer graph:
- a Cast around a blocked node inside an `If` branch is moved into the branch that computes its
  input (left outside, onnxruntime fails: "Node input '..._cast_to_fp16' is not a graph input";
  this is also why blocking `Cast` itself breaks the merged decoder);
- every graph is put back in topological order (the Casts come last; the ONNX checker refuses
  that, onnxruntime sorts it);
- a branch output that is a value of the outer graph is routed through an Identity (onnxruntime:
  "Subgraph output (logits) is an outer scope value being returned directly").

On x86 CPUs and in WASM, float16 runs slower than float32: most kernels there have no float16
form, so onnxruntime casts around them. The variant is for GPUs and WebGPU.
"""

from __future__ import annotations

import onnx
from onnx import helper

from flonnx.export.onnxfile import iter_graphs

# onnxruntime's own list (ML ops, Range, CumSum, Min, Max, TopK, Upsample, ...) and:
# - Resize: its scales must stay float32, and its float16 kernels are missing or inexact on several
#   providers (Florence-2's graphs have none; another export's may);
# - reductions that add up a whole axis: ReduceMean, ReduceSum, ReduceSumSquare, ReduceL2,
#   ReduceLogSumExp, and Pow (a LayerNorm an exporter decomposed). The vision encoder's mean over
#   its image tokens reads values up to 374 on the synthetic model: summed over 577 tokens
#   (768x768) in float16 that passes 65504. Two Casts, no measurable cost;
# - DequantizeLinear: before opset 19 its scale must be float32 (int8-stored conv weights in a
#   float16 graph fail to load: "Type 'tensor(float16)' ... of operator (DequantizeLinear)");
# - RandomNormalLike: as transformers.js's scripts/float16.py.
# Not blocked: Cast (see the module docstring), and LayerNormalization (inputs up to 508 in the
# vision encoder: its squares pass 65504, but onnxruntime's float16 kernels keep the statistics in
# float32), Softmax, Erf. Blocking those three as well changed nothing on the synthetic model
# (vision max abs error 0.0025 -> 0.0019, answers 100/100 either way) and costs two Casts per node
# on a GPU. On x86 CPUs onnxruntime computes most float16 nodes in float32 between Casts, so
# these CPU measurements show float16 weights and stored activations, not float16 arithmetic.
EXTRA_BLOCKED = (
    "Resize",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Pow",
    "DequantizeLinear",
    "RandomNormalLike",
)
# Constants and weights are clamped into float16's range at 1e4, as onnx-community's files are: an
# attention mask's "minus infinity" (float32's lowest, -3.4e38, in the decoder) becomes -1e4, which
# a score can be added to without overflowing to -inf. (65504 answered the same on the synthetic
# model.)
MAX_FINITE = 1e4
MIN_POSITIVE = 1e-7


def op_block_list(extra: tuple[str, ...] = EXTRA_BLOCKED) -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted({*DEFAULT_OP_BLOCK_LIST, *extra})


def convert_to_float16(
    model: onnx.ModelProto,
    blocked: list[str] | None = None,
    max_finite: float = MAX_FINITE,
    min_positive: float = MIN_POSITIVE,
) -> onnx.ModelProto:
    """A float16 copy of `model` with float32 inputs and outputs; `blocked` op types stay float32
    (default: `op_block_list()`)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model,
        min_positive_val=min_positive,
        max_finite_val=max_finite,
        keep_io_types=True,
        op_block_list=op_block_list() if blocked is None else blocked,
    )
    move_casts_into_branches(converted)
    no_outer_values_returned(converted)
    for graph in iter_graphs(converted.graph):
        sort_topologically(graph)
    return converted


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    return names | {out for node in graph.node for out in node.output if out}


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from the scopes around it."""
    defined = _defined(graph)
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in _subgraphs(node):
            used |= outer_names(sub)
    used.update(value.name for value in graph.output)
    return used - defined


def move_casts_into_branches(model: onnx.ModelProto) -> None:
    """Move each node of the outer graph that reads a value only a subgraph computes into that
    subgraph (the Casts the converter writes around blocked nodes inside `If` branches)."""
    outer = model.graph
    producer: dict[str, onnx.GraphProto] = {}
    for graph in iter_graphs(outer):
        if graph is not outer:
            for node in graph.node:
                for out in node.output:
                    producer[out] = graph
    available = _defined(outer)
    kept = []
    for node in outer.node:
        homes = {
            id(producer[name]): producer[name]
            for name in node.input
            if name and name not in available and name in producer
        }
        if not homes:
            kept.append(node)
            continue
        if len(homes) > 1:
            raise ValueError(f"node {node.name!r} reads values of two different subgraphs")
        home = next(iter(homes.values()))
        home.node.append(node)
        for out in node.output:
            producer[out] = home
    if len(kept) != len(outer.node):
        del outer.node[:]
        outer.node.extend(kept)


def no_outer_values_returned(model: onnx.ModelProto) -> None:
    """An `If` branch may not return a value of the outer graph as one of its outputs (onnxruntime:
    "Subgraph output is an outer scope value being returned directly"); the fp16 converter's casts
    can make one. Route such outputs through an Identity. A branch that returns a float32 model
    input the converter kept (`keep_io_types`) returns its float16 cast, as the other branch does."""
    halved = {
        node.input[0]: node.output[0]
        for node in model.graph.node
        if node.op_type == "Cast" and node.name.startswith("graph_input_cast")
    }
    for graph in iter_graphs(model.graph):
        if graph is model.graph:
            continue
        produced = {out for node in graph.node for out in node.output}
        for output in graph.output:
            if output.name not in produced:
                source = output.name
                if source in halved:  # the converter left this output float32: the other branch's is not
                    source = halved[source]
                    output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
                inner = f"{output.name}_branch_output"
                graph.node.append(helper.make_node("Identity", [source], [inner], name=f"{inner}_identity"))
                output.name = inner


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Order `graph`'s nodes so each comes after the nodes computing what it reads (a node with
    subgraphs reads what they read from outside): each node in turn, the nodes it waits for first,
    so a graph already in order keeps its order."""
    nodes = list(graph.node)
    producers: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            if out:
                producers[out] = index
    needs = []
    for node in nodes:
        reads = {name for name in node.input if name}
        for sub in _subgraphs(node):
            reads |= outer_names(sub)
        needs.append(sorted({producers[name] for name in reads if name in producers}))
    order: list[int] = []
    state = [0] * len(nodes)  # 0 not seen, 1 waiting for its inputs, 2 placed
    for root in range(len(nodes)):
        stack = [root]
        while stack:
            index = stack[-1]
            if state[index] == 2:
                stack.pop()
                continue
            state[index] = 1
            waiting = [need for need in needs[index] if state[need] != 2]
            if any(state[need] == 1 for need in waiting):
                raise ValueError(f"graph {graph.name!r} has a cycle through node {nodes[index].name!r}")
            if waiting:
                stack.extend(reversed(waiting))
                continue
            state[index] = 2
            order.append(index)
            stack.pop()
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[index] for index in order)
