"""DaViT's attention blocks as `com.microsoft.MultiHeadAttention` nodes.

The export writes each spatial window attention as its PyTorch code reads: the qkv projection of
the windows [W, T, 3C], a Reshape to [W, T, 3, H, d], a Transpose to [3, W, H, T, d], a Split
into q, k, v, a Transpose of k, two Muls by sqrt(scale), MatMul, Softmax, MatMul, a Transpose
back to [W, T, H, d] and a Reshape to [W, T, C] for the output projection. `fuse_attention`
makes that Split(qkv, last axis) -> MultiHeadAttention(q, k, v): one kernel computes the scaled
scores, the softmax and the weighted sum per window and head and writes [W, T, C] directly.

Measured on base int8, 2 threads (AMD EPYC, AVX-512 VNNI, no AMX; onnxruntime 1.32; alternating
in one process on a loaded machine, medians of 6): window attention fused, vision 2785 -> 2647 ms
(-5%; an earlier quiet run gave 1.052 -> 0.993 s); channel attention fused as well (sequence =
the d channels of a group, heads = the groups, head size = the tokens) 3118 ms, +12%: the
transposes into and out of MultiHeadAttention's layouts (tokens innermost) cost more than the
Softmax and MatMuls saved. So the recipes fuse the window kind only; "channel" stays available
to re-measure on other CPUs.

The subgraph is matched by structure and checked by the constants it holds (the 3 and the head
count of the Reshape, the permutations, the Softmax axis, scalar scales); an attention that does
not match is left as it is. The old nodes are not deleted one by one: the Reshape that ended the
attention reads the fused nodes instead, and the nodes nothing reads any more are removed, so a
tensor still read elsewhere (a Shape chain, say) keeps its producers and the result stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flonnx.export.onnxfile import iter_graphs

MS_DOMAIN = "com.microsoft"


# The Transpose that views qkv [B, T, 3, H, d] as q, k, v, by kind of attention: window attention
# attends over the tokens of a window (q, k, v [B, H, T, d]); channel attention over the channels
# of a group (q, k, v [B, G, d, T]). And the Transpose that brings the attention's output back
# to [B, T, H, d] before the Reshape to [B, T, C].
KINDS = {"window": ([2, 0, 3, 1, 4], [0, 2, 1, 3]), "channel": ([2, 0, 3, 4, 1], [0, 3, 1, 2])}


@dataclass(frozen=True)
class _Match:
    kind: str  # a key of KINDS
    qkv: str  # [B, T, 3C], the projection's output (bias added)
    q: str
    k: str
    v: str
    heads: int
    scale: float
    end: onnx.NodeProto  # the Reshape that read the [B, T, H, d] attention output
    softmax: str  # node name, to count what was fused


class _Graph:
    """Who produces and who reads each tensor, and the constant values, of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def scalar(self, name: str) -> float | None:
        value = self.constant(name)
        if value is None or value.size != 1 or value.dtype.kind != "f":
            return None
        return float(value.reshape(()))

    def ints(self, name: str) -> list[int] | None:
        value = self.constant(name)
        if value is None or value.dtype.kind not in "iu" or value.ndim > 1:
            return None
        return [int(v) for v in value.reshape(-1)]


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    return None if node is None else list(_attribute(node, "perm", []))


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """(x, s) when `name` is x * s or x / s for a scalar constant s (repeatedly); else (name, 1)."""
    scale = 1.0
    while True:
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div"):
            return name, scale
        a, b = node.input
        value = g.scalar(b)
        if value is not None and (value != 0 or node.op_type == "Mul"):
            scale *= value if node.op_type == "Mul" else 1.0 / value
            name = a
        elif node.op_type == "Mul" and g.scalar(a) is not None:
            scale *= g.scalar(a)
            name = b
        else:
            return name, scale


def _dimension_of(g: _Graph, part: str) -> tuple[str, int] | None:
    """(tensor, k) when `part` is Unsqueeze(Gather(Shape(tensor), k)); else None."""
    unsqueeze = g.node(part, "Unsqueeze")
    if unsqueeze is None:
        return None
    axes = g.ints(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else _attribute(unsqueeze, "axes")
    gather = g.node(unsqueeze.input[0], "Gather")
    if list(axes or []) != [0] or gather is None or _attribute(gather, "axis", 0) != 0:
        return None
    index = g.ints(gather.input[1])
    shape = g.node(gather.input[0], "Shape")
    if index is None or len(index) != 1 or shape is None or shape.attribute:
        return None
    return shape.input[0], index[0]


def _shape_parts(g: _Graph, name: str) -> list[tuple[str, int] | int | None] | None:
    """A Reshape's shape entry by entry: an int constant, (tensor, k) for "dimension k of
    tensor", or None for an entry computed some other way. None when the shape is not a constant
    or a Concat."""
    constant = g.ints(name)
    if constant is not None:
        return list(constant)
    concat = g.node(name, "Concat")
    if concat is None:
        return None
    parts: list[tuple[str, int] | int | None] = []
    for part in concat.input:
        values = g.ints(part)
        if values is not None:
            parts += values
            continue
        parts.append(_dimension_of(g, part))
    return parts


def _same_dimension(part, k: int, tensors: set[str]) -> bool:
    """A shape entry that copies dimension k from one of `tensors` (all with that dimension)."""
    return part == 0 or (isinstance(part, tuple) and part[1] == k and part[0] in tensors)


def _qkv_source(g: _Graph, q: str, k: str, v: str) -> tuple[str, str, int] | None:
    """(kind, qkv, heads) when q, k, v are the three parts of qkv [B, T, 3C] as Reshape
    [B, T, 3, H, d] -> Transpose (a KINDS permutation) -> Split/Squeeze (or Gather) on axis 0."""
    sources = []
    for index, name in enumerate((q, k, v)):
        node = g.producer.get(name)
        if node is not None and node.op_type == "Squeeze":
            axes = g.ints(node.input[1]) if len(node.input) > 1 else _attribute(node, "axes")
            split = g.node(node.input[0], "Split")
            if list(axes or []) != [0] or split is None or _attribute(split, "axis", 0) != 0:
                return None
            if len(split.output) != 3 or split.output[index] != node.input[0]:
                return None
            sizes = g.ints(split.input[1]) if len(split.input) > 1 and split.input[1] else [1, 1, 1]
            if sizes != [1, 1, 1]:
                return None
            sources.append(split.input[0])
        elif node is not None and node.op_type == "Gather":
            if _attribute(node, "axis", 0) != 0 or g.ints(node.input[1]) not in ([index], [index - 3]):
                return None
            if g.constant(node.input[1]).ndim != 0:
                return None
            sources.append(node.input[0])
        else:
            return None
    if len(set(sources)) != 1:
        return None
    transpose = g.node(sources[0], "Transpose")
    kind = next((kind for kind, (perm, _) in KINDS.items() if _perm(transpose) == perm), None)
    if kind is None:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or _attribute(reshape, "allowzero", 0):
        return None
    qkv = reshape.input[0]
    parts = _shape_parts(g, reshape.input[1])
    if parts is None or len(parts) != 5 or parts[2] != 3 or not isinstance(parts[3], int) or parts[3] < 1:
        return None
    # The first two entries copy qkv's first two dimensions: qkv is then [W, T, 3C] (the count of
    # elements leaves no room for another leading dimension) and d = C / H.
    leading = _leading_tensors(g, qkv)
    if not (_same_dimension(parts[0], 0, leading) and _same_dimension(parts[1], 1, leading)):
        return None
    return kind, qkv, parts[3]


def _leading_tensors(g: _Graph, qkv: str) -> set[str]:
    """qkv and the tensors it keeps the leading dimensions of: MatMul(x, W) (+ bias) keeps x's."""
    names = {qkv}
    node = g.producer.get(qkv)
    if node is not None and node.op_type == "Add":
        for name in node.input:
            inner = g.node(name, "MatMul")
            if inner is not None:
                names |= {name, inner.input[0]}
    elif node is not None and node.op_type == "MatMul":
        names.add(node.input[0])
    return names


def _match(g: _Graph, softmax: onnx.NodeProto, kinds) -> _Match | None:
    if _attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    scores, scale = _scaled(g, softmax.input[0])
    product = g.node(scores, "MatMul")
    readers = g.readers.get(softmax.output[0], [])
    if product is None or len(readers) != 1 or readers[0].op_type != "MatMul":
        return None
    weighted = readers[0]
    if weighted.input[0] != softmax.output[0]:
        return None
    q, q_scale = _scaled(g, product.input[0])
    k_transposed, k_scale = _scaled(g, product.input[1])
    transpose = g.node(k_transposed, "Transpose")
    if _perm(transpose) != [0, 1, 3, 2]:
        return None
    k, inner_scale = _scaled(g, transpose.input[0])
    v = weighted.input[1]
    source = _qkv_source(g, q, k, v)
    if source is None or source[0] not in kinds:
        return None
    kind, qkv, heads = source
    parts = {q, k, v}

    # The output -> (Reshape to itself) -> Transpose to [B, T, H, d] -> Reshape: that Reshape
    # then reads the same elements in the same order from the fused nodes' [B, T, H, d].
    context = weighted.output[0]
    node = _only_reader(g, context)
    if node is not None and node.op_type == "Reshape":
        shape = _shape_parts(g, node.input[1])
        same = parts | {context}
        if shape is None or len(shape) != 4 or _attribute(node, "allowzero", 0) or None in shape:
            return None
        entries = [
            _same_dimension(shape[0], 0, same),
            shape[1] in (heads, -1),
            _same_dimension(shape[2], 2, same),
            _same_dimension(shape[3], 3, same),
        ]
        if not all(entries):
            return None
        context, node = node.output[0], _only_reader(g, node.output[0])
    if node is None or _perm(node) != KINDS[kind][1]:
        return None
    end = _only_reader(g, node.output[0])
    if end is None or end.op_type != "Reshape":
        return None
    total = scale * q_scale * k_scale * inner_scale
    return _Match(kind, qkv, q, k, v, heads, total, end, softmax.name or softmax.output[0])


def _only_reader(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The one node that reads `name` for its values (Shape readers aside), or None."""
    readers = [node for node in g.readers.get(name, []) if node.op_type != "Shape"]
    return readers[0] if len(readers) == 1 else None


def _live_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes without those whose outputs nothing reads (repeatedly)."""
    nodes = list(graph.node)
    while True:
        read = {v.name for v in graph.output}
        for node in nodes:
            read.update(node.input)
            for attribute in node.attribute:
                subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
                for sub in subs:  # a subgraph may read the values of the graphs around it
                    read |= {name for inner in iter_graphs(sub) for n in inner.node for name in n.input}
        kept = [node for node in nodes if any(out in read for out in node.output if out)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def fuse_attention(model: onnx.ModelProto, kinds: tuple[str, ...] = ("window",)) -> dict[str, int]:
    """Rewrite, in place, every attention of `kinds` (keys of KINDS) that matches; returns how many
    of each kind were fused."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown attention kind {', '.join(sorted(unknown))}, expected: {', '.join(KINDS)}")
    fused = dict.fromkeys(kinds, 0)
    opset = _opset(model)
    for graph in iter_graphs(model.graph):
        g = _Graph(graph)
        matches = [
            m for node in graph.node if node.op_type == "Softmax" for m in [_match(g, node, kinds)] if m
        ]
        if not matches:
            continue
        by_end = {id(m.end): m for m in matches}
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            match = by_end.get(id(node))
            if match is not None:
                new, output = (_window if match.kind == "window" else _channel)(match, graph, opset)
                nodes += new
                node.input[0] = output
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        live = _live_nodes(graph)
        del graph.node[:]
        graph.node.extend(live)
        remaining = {node.name or node.output[0] for node in graph.node if node.op_type == "Softmax"}
        for match in matches:
            fused[match.kind] += match.softmax not in remaining
    if any(fused.values()) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unread_initializers(model)
    return fused


def _attention(match: _Match, q: str, k: str, v: str, out: str, base: str) -> onnx.NodeProto:
    return helper.make_node(
        "MultiHeadAttention",
        [q, k, v],
        [out],
        name=f"{base}/attention",
        domain=MS_DOMAIN,
        num_heads=match.heads,
        scale=match.scale,
    )


def _window(match: _Match, graph: onnx.GraphProto, opset: int) -> tuple[list[onnx.NodeProto], str]:
    """q, k, v [B, T, C] split from qkv; MultiHeadAttention writes [B, T, H * d]."""
    base = f"{match.qkv}/mha"
    q, k, v = f"{base}/q", f"{base}/k", f"{base}/v"
    split = helper.make_node("Split", [match.qkv], [q, k, v], name=f"{base}/split", axis=-1)
    if opset >= 18:  # Split then needs its number of outputs
        split.attribute.append(helper.make_attribute("num_outputs", 3))
    return [split, _attention(match, q, k, v, f"{base}/out", base)], f"{base}/out"


def _channel(match: _Match, graph: onnx.GraphProto, opset: int) -> tuple[list[onnx.NodeProto], str]:
    """Sequence = the d channels of a group, heads = the G groups, head size = the T tokens:
    k and v [B, G, d, T] are already in MultiHeadAttention's [B, heads, sequence, head size]
    form; q becomes [B, d, G * T]; the output [B, d, G * T] goes back to [B, T, G, d]."""
    base = f"{match.q}/mha"
    shapes = {
        f"{base}/q_shape": [0, 0, -1],
        f"{base}/out_shape": [0, 0, match.heads, -1],
    }
    for name, values in shapes.items():
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    nodes = [
        helper.make_node("Transpose", [match.q], [f"{base}/q_t"], name=f"{base}/q_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{base}/q_t", f"{base}/q_shape"], [f"{base}/q"], name=f"{base}/q"),
        _attention(match, f"{base}/q", match.k, match.v, f"{base}/out", base),
        helper.make_node(
            "Reshape", [f"{base}/out", f"{base}/out_shape"], [f"{base}/out4"], name=f"{base}/out4"
        ),
        helper.make_node(
            "Transpose", [f"{base}/out4"], [f"{base}/out_t"], name=f"{base}/out_t", perm=[0, 3, 2, 1]
        ),
    ]
    return nodes, f"{base}/out_t"


def fuse_window_attention(model: onnx.ModelProto) -> int:
    """The window attentions only; returns how many were fused."""
    return fuse_attention(model, ("window",))["window"]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    read = set()
    for graph in iter_graphs(model.graph):
        read |= {name for node in graph.node for name in node.input}
        read |= {v.name for v in graph.output}
    for graph in iter_graphs(model.graph):
        kept = [t for t in graph.initializer if t.name in read]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)
