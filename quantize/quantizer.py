"""Graph rewrites that quantize one component's ONNX model.

- int8 MatMuls: onnxruntime's dynamic quantizer (`EnableSubgraph` reaches the merged decoder's
  `If` branches, whose shared weights live in the outer graph).
- 4- and 8-bit `MatMulNBits`: packed here with numpy in the contrib op's layout; onnxruntime's own
  MatMulNBitsQuantizer needs onnx_ir and reconfigures logging at import.
- Embedding tables: int8 with one scale per row, Gather -> Cast -> Mul.
- Conv weights: stored int8 per output channel behind a DequantizeLinear, so the convolution
  still computes in fp32 (int8 ConvInteger is several times slower on CPU).
- Fused attention: first, DaViT's window attention as MultiHeadAttention nodes (attention.py).
- float16: last, onnxruntime's converter with float32 inputs and outputs (float16.py); quantized
  ops then take float16 scales and activations.

Weights are looked up through the graph tree, quantized once, and stored in the graph that
held them, so a weight both decoder branches share stays stored once.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flonnx.export.onnxfile import iter_graphs
from flonnx.runtime.errors import FlonnxError

from .attention import fuse_window_attention
from .float16 import convert_to_float16
from .recipes import ComponentRecipe

MS_DOMAIN = "com.microsoft"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # the merged decoder's input (DESIGN.md §1)
MIN_TABLE_ROWS = 64  # smaller Gather tables are not worth an extra node


class QuantizeError(FlonnxError):
    """A graph that cannot be quantized, or a quantized variant that does not work."""


# -- the graph tree -----------------------------------------------------------------------------


def iter_nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto]]:
    for sub in iter_graphs(graph):
        for node in sub.node:
            yield sub, node


@dataclass
class _Weight:
    graph: onnx.GraphProto  # the graph that stores it
    tensor: TensorProto


def _weights(model: onnx.ModelProto) -> dict[str, _Weight]:
    """Initializers of every graph by name (the exporters write unique names across branches)."""
    found: dict[str, _Weight] = {}
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.name in found:
                raise QuantizeError(f"initializer {tensor.name!r} is defined in two graphs")
            found[tensor.name] = _Weight(graph, tensor)
    return found


def float_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float32 weights in every graph: what quantization is meant to shrink."""
    total = 0
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_type == TensorProto.FLOAT:
                total += 4 * int(np.prod(tensor.dims, dtype=np.int64))
    return total


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: node selections below are by name."""
    used = {node.name for _, node in iter_nodes(model.graph) if node.name}
    count = 0
    for _, node in iter_nodes(model.graph):
        if not node.name:
            while f"{node.op_type}_flonnx_{count}" in used:
                count += 1
            node.name = f"{node.op_type}_flonnx_{count}"
            used.add(node.name)


def _drop_unused(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the initializers in `names` that no node of any graph reads anymore."""
    read = {name for _, node in iter_nodes(model.graph) for name in node.input}
    read |= {value.name for graph in iter_graphs(model.graph) for value in graph.output}
    for graph in iter_graphs(model.graph):
        kept = [t for t in graph.initializer if t.name not in names or t.name in read]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _float_matrix(weights: dict[str, _Weight], name: str) -> _Weight | None:
    weight = weights.get(name)
    if weight is None or weight.tensor.data_type != TensorProto.FLOAT or len(weight.tensor.dims) != 2:
        return None
    return weight


# -- finding MatMuls by what they do -------------------------------------------------------------


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose B is a 2-D float initializer (activation x activation MatMuls excluded)."""
    weights = _weights(model)
    return [
        node
        for _, node in iter_nodes(model.graph)
        if node.op_type == "MatMul" and _float_matrix(weights, node.input[1]) is not None
    ]


def find_role(model: onnx.ModelProto, role: str, vocab_size: int) -> set[str]:
    """Names of the MatMul nodes that play `role`, traced from the graph, not from names.

    lm_head: its weight is [d_model, vocab_size]. cross_attention_kv: it reads the decoder input
    `encoder_hidden_states` (only the cross-attention K/V projections do).
    """
    weights = _weights(model)
    found = set()
    for node in weight_matmuls(model):
        if role == "lm_head":
            hit = weights[node.input[1]].tensor.dims[1] == vocab_size
        elif role == "cross_attention_kv":
            hit = node.input[0] == ENCODER_HIDDEN_STATES
        else:
            raise QuantizeError(f"unknown MatMul role {role!r}")
        if hit:
            found.add(node.name)
    if not found:
        raise QuantizeError(f"no MatMul plays the {role} role in graph {model.graph.name!r}")
    return found


# -- int8 MatMuls: onnxruntime's dynamic quantizer ------------------------------------------------


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's quantizer logs through the root logger; keep its advice off the console."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_matmuls_int8(
    model: onnx.ModelProto, per_channel: bool, exclude: set[str] | None = None
) -> onnx.ModelProto:
    """Dynamic int8: int8 weights (per output column when `per_channel`), uint8 activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="flonnx-quantize-") as folder, _quiet_logging():
        path = Path(folder) / "model.onnx"
        quantize_dynamic(
            model,
            path,
            op_types_to_quantize=["MatMul"],  # the default would also quantize Gather and Conv
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(exclude or ()),
            # DefaultTensorType: shape inference gives no type to the outputs of contrib ops
            # (fused attention); every activation here is float32.
            extra_options={
                "EnableSubgraph": True,
                "MatMulConstBOnly": True,
                "DefaultTensorType": TensorProto.FLOAT,
            },
        )
        return onnx.load(str(path))


# -- 4- and 8-bit MatMulNBits -------------------------------------------------------------------


def effective_block_size(block_size: int, rows: int) -> int:
    """A block no longer than the weight's K (a power of two >= 16): padding K would waste bytes."""
    return max(16, min(block_size, 1 << (max(rows, 1).bit_length() - 1)))


def pack_nbits(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of W [K, N] in MatMulNBits' layout.

    Returns B uint8 [N, blocks, block_size * bits / 8] (4-bit: even index in the low nibble) and
    scales float32 [N, blocks]. No zero points: the op's default (8 for 4 bits, 128 for 8) makes
    the codes symmetric. As onnxruntime does, the largest-magnitude value of a block maps exactly
    to the most negative code, which uses the whole [-2^(b-1), 2^(b-1)-1] range.
    """
    rows, cols = weight.shape
    block_size = effective_block_size(block_size, rows)
    blocks = -(-rows // block_size)
    padded = np.zeros((cols, blocks * block_size), np.float32)
    padded[:, :rows] = weight.T
    padded = padded.reshape(cols, blocks, block_size)
    extreme = np.take_along_axis(padded, np.abs(padded).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    low = -(1 << (bits - 1))
    scales = (extreme / low).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)
    codes = (np.clip(np.rint(padded / safe[..., None]), low, -low - 1) - low).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes), scales


def quantize_matmuls_nbits(
    model: onnx.ModelProto,
    bits: int,
    block_size: int,
    accuracy_level: int,
    only: set[str] | None = None,
) -> onnx.ModelProto:
    """Replace weight MatMuls (all, or the named `only`) by com.microsoft MatMulNBits."""
    if bits not in (4, 8):
        raise QuantizeError(f"MatMulNBits takes 4 or 8 bits, got {bits}")
    weights = _weights(model)
    packed: dict[str, tuple[str, str]] = {}
    replaced: set[str] = set()
    for graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.op_type != "MatMul" or (only is not None and node.name not in only):
                continue
            weight = _float_matrix(weights, node.input[1])
            if weight is None:
                continue
            name = weight.tensor.name
            rows, cols = weight.tensor.dims
            if name not in packed:
                codes, scales = pack_nbits(numpy_helper.to_array(weight.tensor), bits, block_size)
                packed[name] = (f"{name}_q{bits}", f"{name}_q{bits}_scales")
                weight.graph.initializer.extend(
                    [
                        numpy_helper.from_array(codes, packed[name][0]),
                        numpy_helper.from_array(scales, packed[name][1]),
                    ]
                )
            new = helper.make_node(
                "MatMulNBits",
                [node.input[0], *packed[name]],
                list(node.output),
                name=f"{node.name}_q{bits}",
                domain=MS_DOMAIN,
                K=rows,
                N=cols,
                bits=bits,
                block_size=effective_block_size(block_size, rows),
                accuracy_level=accuracy_level,
            )
            graph.node[index].CopyFrom(new)
            replaced.add(name)
    if only is not None and not replaced:
        raise QuantizeError(f"none of the MatMuls {sorted(only)} has a constant 2-D weight")
    _drop_unused(model, replaced)
    _ensure_opset(model, MS_DOMAIN, 1)
    return model


# -- embedding tables and convolution weights ----------------------------------------------------


def _rewrite_nodes(model: onnx.ModelProto, rewrite) -> None:
    """Replace each node for which `rewrite(node, done)` returns a list of nodes.

    `done` is a set private to the graph being rebuilt (what it already computes). Graphs are
    rebuilt innermost first: rebuilding a graph copies the subgraphs of its nodes, so a subgraph
    must be final before its parent is rebuilt.
    """
    for graph in reversed(list(iter_graphs(model.graph))):
        nodes: list[onnx.NodeProto] = []
        done: set[str] = set()
        changed = False
        for node in graph.node:
            replacement = rewrite(node, done)
            changed |= replacement is not None
            nodes.extend([node] if replacement is None else replacement)
        if changed:
            del graph.node[:]
            graph.node.extend(nodes)


def quantize_gather_tables(model: onnx.ModelProto, min_rows: int = MIN_TABLE_ROWS) -> onnx.ModelProto:
    """Gather(table fp32) -> Mul(Cast(Gather(table int8)), Gather(row scales)): 4x smaller tables."""
    weights = _weights(model)
    tables: dict[str, tuple[str, str]] = {}

    def rewrite(node: onnx.NodeProto, done: set[str]) -> list[onnx.NodeProto] | None:
        weight = _float_matrix(weights, node.input[0]) if node.op_type == "Gather" else None
        if weight is None or _attribute(node, "axis", 0) != 0 or weight.tensor.dims[0] < min_rows:
            return None
        name = weight.tensor.name
        if name not in tables:
            table = numpy_helper.to_array(weight.tensor)
            scales = np.abs(table).max(axis=1, keepdims=True) / 127
            scales = np.where(scales == 0, 1, scales).astype(np.float32)
            codes = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
            tables[name] = (f"{name}_int8", f"{name}_row_scales")
            weight.graph.initializer.extend(
                [
                    numpy_helper.from_array(codes, tables[name][0]),
                    numpy_helper.from_array(scales, tables[name][1]),
                ]
            )
        codes_name, scales_name = tables[name]
        out, ids = node.output[0], node.input[1]
        prefix = node.name or out
        return [
            helper.make_node("Gather", [codes_name, ids], [f"{out}/int8"], name=f"{prefix}/int8"),
            helper.make_node(
                "Cast", [f"{out}/int8"], [f"{out}/cast"], name=f"{prefix}/cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [scales_name, ids], [f"{out}/scale"], name=f"{prefix}/scale"),
            helper.make_node("Mul", [f"{out}/cast", f"{out}/scale"], [out], name=f"{prefix}/dequantize"),
        ]

    _rewrite_nodes(model, rewrite)
    _drop_unused(model, set(tables))
    return model


def store_conv_weights_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv(x, W) -> Conv(x, DequantizeLinear(W int8, per-output-channel scale)): fp32 compute."""
    weights = _weights(model)
    stored: set[str] = set()

    def rewrite(node: onnx.NodeProto, done: set[str]) -> list[onnx.NodeProto] | None:
        weight = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or weight.tensor.data_type != TensorProto.FLOAT or len(weight.tensor.dims) < 3:
            return None
        name = weight.tensor.name
        codes_name, scales_name, zero_name = f"{name}_int8", f"{name}_scales", f"{name}_zero_point"
        if name not in stored:
            kernel = numpy_helper.to_array(weight.tensor)
            scales = np.abs(kernel.reshape(kernel.shape[0], -1)).max(axis=1) / 127
            scales = np.where(scales == 0, 1, scales).astype(np.float32)
            codes = np.clip(np.rint(kernel / scales.reshape((-1,) + (1,) * (kernel.ndim - 1))), -127, 127)
            weight.graph.initializer.extend(
                [
                    numpy_helper.from_array(codes.astype(np.int8), codes_name),
                    numpy_helper.from_array(scales, scales_name),
                    numpy_helper.from_array(np.zeros(scales.shape, np.int8), zero_name),
                ]
            )
            stored.add(name)
        nodes = []
        dequantized = f"{name}_dequantized"
        if dequantized not in done:  # once per graph that convolves with this weight
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [codes_name, scales_name, zero_name],
                    [dequantized],
                    name=f"{name}_dequantize",
                    axis=0,
                )
            )
            done.add(dequantized)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[1] = dequantized
        return [*nodes, conv]

    _rewrite_nodes(model, rewrite)
    _drop_unused(model, stored)
    return model


# -- one component --------------------------------------------------------------------------------


def quantize_component(model: onnx.ModelProto, recipe: ComponentRecipe, vocab_size: int) -> onnx.ModelProto:
    """Apply `recipe` to a copy of `model`; checks the result and that it holds fewer float bytes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    _name_nodes(result)
    before = float_bytes(result)
    if recipe.fused_attention:
        fuse_window_attention(result)
    if recipe.gather_tables_int8:
        result = quantize_gather_tables(result)
    if recipe.matmul_bits == 8 and recipe.kernel == "dynamic":
        result = quantize_matmuls_int8(result, recipe.per_channel)
    elif recipe.matmul_bits == 8:
        result = quantize_matmuls_nbits(result, 8, recipe.block_size, recipe.accuracy_level)
    elif recipe.matmul_bits == 4:
        eight_bit = set()
        for role in recipe.eight_bit_roles:
            eight_bit |= find_role(result, role, vocab_size)
        if eight_bit:
            result = quantize_matmuls_nbits(
                result, 8, recipe.eight_bit_block_size, recipe.accuracy_level, only=eight_bit
            )
        result = quantize_matmuls_nbits(result, 4, recipe.block_size, recipe.accuracy_level)
    if recipe.conv_weights_int8:
        result = store_conv_weights_int8(result)
    if recipe.float16:
        result = convert_to_float16(result)
    for graph in iter_graphs(result.graph):
        del graph.value_info[:]  # shape inference's leftovers: onnxruntime infers shapes itself
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise QuantizeError(f"the quantized graph {model.graph.name!r} is not valid ONNX: {first}") from None
    after = float_bytes(result)
    if after >= before:
        raise QuantizeError(
            f"graph {model.graph.name!r} keeps {after} of its {before} float bytes: nothing was quantized"
        )
    return result


# -- the tied embedding, stored once ---------------------------------------------------------------

DATA_ALIGNMENT = 4096  # external tensors start on page boundaries, so onnxruntime can map them


@dataclass(frozen=True)
class TiedEmbedding:
    """The embedding table both graphs read: 8-bit codes and block scales in one external file."""

    location: str  # file name, relative to the graphs that reference it
    data: bytes
    rows: int
    columns: int
    block_size: int


def _external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    from onnx.external_data_helper import set_external_data

    if not tensor.HasField("raw_data"):
        tensor.raw_data = numpy_helper.to_array(tensor).tobytes()
    set_external_data(tensor, location, offset=offset, length=length)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def tie_embedding(
    embed: onnx.ModelProto, decoder: onnx.ModelProto, vocab_size: int, location: str
) -> TiedEmbedding | None:
    """Store the embedding table once for both graphs, in place; None when the two are not tied.

    The decoder's lm_head must already be an 8-bit MatMulNBits (B [vocab, blocks, block] with
    block scales [vocab, blocks], default zero point 128). Its codes are the embedding table's
    own rows, so embed_tokens' Gather becomes a GatherBlockQuantized over the same bytes (the
    contrib op follows MatMulNBits' conventions for uint8 data). Both graphs then reference one
    external file. The tie is proved, not assumed: the fp32 table must pack to exactly lm_head's
    codes and scales. Scales a float16 decoder holds as float16 are shared as they are: the lookup
    then yields float16 rows, cast to float32 for the rest of embed_tokens.
    """
    weights = _weights(decoder)
    lm_head = [
        node
        for _, node in iter_nodes(decoder.graph)
        if node.op_type == "MatMulNBits"
        and _attribute(node, "N", 0) == vocab_size
        and _attribute(node, "bits", 0) == 8
    ]
    # One node per decoder branch, all reading the same weights; no zero points (the default 128).
    if not lm_head or len({tuple(node.input[1:]) for node in lm_head}) != 1 or len(lm_head[0].input) != 3:
        return None
    node = lm_head[0]
    columns, block_size = _attribute(node, "K", 0), _attribute(node, "block_size", 0)
    if any((_attribute(n, "K", 0), _attribute(n, "block_size", 0)) != (columns, block_size) for n in lm_head):
        return None
    if columns % block_size:
        return None  # padded blocks: the codes are not a [vocab, K] table
    codes_weight, scales_weight = weights.get(node.input[1]), weights.get(node.input[2])
    embed_weights = _weights(embed)
    gathers = [
        (graph, index, graph_node)
        for graph in iter_graphs(embed.graph)
        for index, graph_node in enumerate(graph.node)
        if graph_node.op_type == "Gather"
        and _float_matrix(embed_weights, graph_node.input[0]) is not None
        and list(embed_weights[graph_node.input[0]].tensor.dims) == [vocab_size, columns]
    ]
    if codes_weight is None or scales_weight is None or len(gathers) != 1:
        return None
    graph, index, gather = gathers[0]
    if _attribute(gather, "axis", 0) != 0:
        return None
    codes = numpy_helper.to_array(codes_weight.tensor)
    scales = numpy_helper.to_array(scales_weight.tensor)
    if scales.dtype not in (np.float32, np.float16):
        return None
    table = embed_weights[gather.input[0]].tensor
    packed_codes, packed_scales = pack_nbits(numpy_helper.to_array(table).T, 8, block_size)
    same_scales = np.array_equal(packed_scales.astype(scales.dtype), scales)
    if not (np.array_equal(packed_codes, codes) and same_scales):
        return None  # untied checkpoint: each graph keeps its own table

    scales_offset = -(-codes.nbytes // DATA_ALIGNMENT) * DATA_ALIGNMENT
    data = codes.tobytes() + bytes(scales_offset - codes.nbytes) + scales.tobytes()
    _external(codes_weight.tensor, location, 0, codes.nbytes)
    _external(scales_weight.tensor, location, scales_offset, scales.nbytes)

    codes_name, scales_name = f"{table.name}_tied_q8", f"{table.name}_tied_q8_scales"
    codes_table = numpy_helper.from_array(codes.reshape(vocab_size, columns), codes_name)
    scales_table = numpy_helper.from_array(scales, scales_name)
    _external(codes_table, location, 0, codes.nbytes)
    _external(scales_table, location, scales_offset, scales.nbytes)
    embed_weights[gather.input[0]].graph.initializer.extend([codes_table, scales_table])
    rows = gather.output[0] if scales.dtype == np.float32 else f"{gather.output[0]}/float16"
    name = gather.name or f"{gather.output[0]}/tied"
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [codes_name, gather.input[1], scales_name],
        [rows],
        name=name,
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=block_size,
        bits=8,
    )
    widen = helper.make_node("Cast", [rows], [gather.output[0]], name=f"{name}/float32", to=TensorProto.FLOAT)
    nodes = [lookup] if rows == gather.output[0] else [lookup, widen]
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend([*kept[:index], *nodes, *kept[index + 1 :]])
    _drop_unused(embed, {table.name})
    _ensure_opset(embed, MS_DOMAIN, 1)
    return TiedEmbedding(location, data, vocab_size, columns, block_size)
