"""The machine's floors, measured in the bench's own run: what the timings are divided by.

- sgemm: onnxruntime's float32 MatMul (MLAS) on a 2048^3 product with a constant B, the shape of
  a weight MatMul (B prepacked at load, as in our graphs).
- int8 GEMM: the same product quantized as our int8 recipe quantizes a MatMul: onnxruntime's
  `quantize_dynamic` (MatMul only, int8 weights per column, `MatMulConstBOnly`), which onnxruntime
  runs as DynamicQuantizeLinear + MatMulInteger, fused into com.microsoft.DynamicQuantizeMatMul.
  The clock includes quantizing the activations, as in the graphs. Counted in GOP/s (2 per MAC).
- memory bandwidth: a large array copy, read + write counted.
- a decoder step's bytes: the weights a later step reads (`decode_step_bytes`) and its K/V cache
  (`cache_bytes`); over the bandwidth they give the step's floor.
- the vision encoder's FLOPs, split into what runs as integer GEMMs and what stays in float32
  (`graph_flops`); over sgemm and the int8 GEMM rate they give its floors.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

GEMM_SIZE = 2048
# Ops of our graphs that multiply matrices, by how they compute: the integer ones run on the int8
# GEMM kernels (MatMulNBits at accuracy level 4 quantizes its activations to int8 too).
INTEGER_MATMULS = {
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "MatMulNBits",
}
FLOAT_MATMULS = {"MatMul", "FusedMatMul", "Gemm"}
INTEGER_CONVS = {"ConvInteger", "QLinearConv"}
FLOAT_CONVS = {"Conv", "FusedConv"}
# Fused attention (onnxruntime's contrib op, as the int8 recipe may write window attention):
# its two products, Q K^T and the weighted sum of V, run in float32.
ATTENTIONS = {"MultiHeadAttention"}
CPU_FEATURES = ("avx512_vnni", "avx512_bf16", "amx")


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _session(model, threads: int, **options):
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    for name, value in options.items():
        setattr(settings, name, value)
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, settings, providers=["CPUExecutionProvider"])


def _matmul_model(size: int):
    """a [size, size] @ B (a constant [size, size]): the shape of a weight MatMul."""
    from onnx import TensorProto, helper, numpy_helper  # the export extra brings onnx

    weight = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        [numpy_helper.from_array(weight, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_rate(session, size: int, repeats: int) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    session.run(None, {"a": a})
    best = min(_timed(lambda: session.run(None, {"a": a})) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def sgemm_gflops(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """float32 GFLOP/s of onnxruntime's MatMul on this machine."""
    return _gemm_rate(_session(_matmul_model(size), threads), size, repeats)


def int8_gemm_gops(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """GOP/s of the same MatMul after dynamic int8 quantization (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "consider pre-processing": advice for static quantization
    try:
        with tempfile.TemporaryDirectory(prefix="flonnx-bench-") as scratch:
            path = Path(scratch) / "int8.onnx"
            quantize_dynamic(
                _matmul_model(size),
                path,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            model = onnx.load(str(path))
    finally:
        logging.disable(quiet)
    return _gemm_rate(_session(model, threads), size, repeats)


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large array copy (read + write counted)."""
    source = np.ones(megabytes * (1 << 20) // 4, np.float32)
    target = np.empty_like(source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best / 1e9


def machine_rates(threads: int) -> dict:
    """sgemm GFLOP/s, int8 GEMM GOP/s and memory GB/s, measured now."""
    return {
        "sgemm_gflops": sgemm_gflops(threads),
        "int8_gemm_gops": int8_gemm_gops(threads),
        "memory_gb_s": memory_bandwidth(),
    }


def best_rates(measured: list[dict]) -> dict:
    """Each rate's best of several measurements (a floor is what the machine can do), and all of
    them under "runs" so a machine whose speed changed during the run shows it."""
    best = {key: max(rates[key] for rates in measured) for key in measured[0]}
    return {**best, "runs": measured}


def graph_flops(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> dict:
    """FLOPs of one run of an ONNX graph, by how they compute: {"integer", "float", "by_op"}.

    Exact for the graph as written: the graph runs once unoptimized (so no node is fused or
    re-laid out) with onnxruntime's profiler on, and each matrix product and convolution is
    counted from the input and output shapes the profiler recorded (2 FLOPs per multiply-add;
    elementwise ops, normalisation and softmax are not counted). PyTorch's FlopCounterMode on the
    same module agrees on the convolutions and the weight products but misses the attention
    products that run inside scaled_dot_product_attention on CPU (base vision: 10.5 of 381 GFLOP)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="flonnx-bench-profile-") as scratch:
        session = _session(
            str(path),
            threads,
            enable_profiling=True,
            profile_file_prefix=str(Path(scratch) / "vision"),
            graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        )
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event["args"]
        flops = node_flops(args["op_name"], _shapes(args, "input"), _shapes(args, "output"))
        if flops:
            by_op[args["op_name"]] = by_op.get(args["op_name"], 0.0) + flops
    integer = sum(v for op, v in by_op.items() if op in INTEGER_MATMULS | INTEGER_CONVS)
    return {"integer": integer, "float": sum(by_op.values()) - integer, "by_op": by_op}


def _shapes(args: dict, side: str) -> list[list[int]]:
    return [next(iter(entry.values())) for entry in args.get(f"{side}_type_shape", [])]


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """2 x multiply-adds of one matrix product or convolution; 0 for any other op."""
    if not outputs:
        return 0.0
    out = float(np.prod(outputs[0], dtype=np.float64))
    if op in INTEGER_MATMULS | FLOAT_MATMULS:
        # each output element is a dot product over K; A is [..., M, K] ([K, M] for Gemm transA,
        # which our graphs do not use); MatMulNBits' B is packed, so K comes from A
        return 2 * out * inputs[0][-1]
    if op in INTEGER_CONVS | FLOAT_CONVS:
        weight = inputs[3] if op == "QLinearConv" else inputs[1]  # [C_out, C_in / groups, kH, kW]
        return 2 * out * float(np.prod(weight[1:]))
    if op in ATTENTIONS:
        return _attention_flops(inputs, outputs[0])
    return 0.0


def _attention_flops(inputs: list[list[int]], output: list[int]) -> float:
    """MultiHeadAttention: query [B, S, D] with key [B, S_kv, D] (or [B, heads, S_kv, D / heads]),
    or one packed [B, S, heads, 3, D / heads] query; output [B, S, D_v]. 2 B S S_kv (D + D_v)."""
    query = inputs[0]
    if len(query) == 5:
        batch, length, width = query[0], query[1], query[2] * query[4]
        kv_length = length
    else:
        batch, length, width = query
        key = inputs[1]
        kv_length = key[-2] if len(key) == 4 else key[1]
    return 2.0 * batch * length * kv_length * (width + output[-1])


def vision_floor(flops: dict, sgemm: float, int8_gemm: float) -> float:
    """Seconds of a vision pass if every integer product ran at the int8 GEMM rate and every float
    one at sgemm (the fp32 graph has no integer products: its floor is FLOPs / sgemm)."""
    return flops["integer"] / 1e9 / int8_gemm + flops["float"] / 1e9 / sgemm


def decode_step_bytes(path: Path) -> int:
    """Bytes of the weights a later decoder step reads: the with-past branch's and shared ones.

    Tensors used only to compute the cross-attention K/V at the first step are not read again,
    and neither is the embedding table (one row per step)."""
    import onnx

    model = onnx.load(str(path))
    outer = {t.name: t for t in model.graph.initializer}
    if_node = next((n for n in model.graph.node if n.op_type == "If"), None)
    if if_node is None:
        return sum(_nbytes(t) for t in outer.values())
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    used = {name for node in then.node for name in node.input}
    total = sum(_nbytes(t) for t in then.initializer)
    total += sum(_nbytes(t) for name, t in outer.items() if name in used)
    return total


def _nbytes(tensor) -> int:
    from onnx import helper

    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def cache_bytes(layout, encoder_tokens: int, new_tokens: int) -> int:
    """float32 K/V bytes one batch-1 decoder step reads after the first: every layer's cross-attention
    K and V over `encoder_tokens`, and its self-attention K and V at the mean length of steps 2 to
    `new_tokens` (the steps the bench times)."""
    mean_length = (2 + new_tokens) / 2 if new_tokens > 1 else 0
    return int(layout.layers * 2 * (encoder_tokens + mean_length) * layout.heads * layout.head_dim * 4)


def cpu_features(cpuinfo: str | None = None) -> dict:
    """The CPU model and the instruction sets that decide int8 and bf16 speed, from /proc/cpuinfo
    (`amx`: any of amx_tile, amx_int8, amx_bf16). Unknown where /proc/cpuinfo is unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    found = {"model": model or "unknown CPU", "flags_known": bool(flags)}
    found.update({name: name in flags for name in ("avx512_vnni", "avx512_bf16")})
    found["amx"] = bool({"amx_tile", "amx_int8", "amx_bf16"} & flags)
    found["amx_bf16"] = "amx_bf16" in flags
    return found
