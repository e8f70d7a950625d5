"""onnx-community-style folders made from a flonnx export, the way their files were made.

onnx-community's Florence-2 folders (what transformers.js users download) hold the same four graphs
under the same names, with every weight inside its .onnx file, the original config.json layout,
no `flonnx.json`, and variants made by transformers.js's `scripts/quantize.py`:
- q8 (`_quantized`): dynamic int8 of every op onnxruntime's IntegerOps registry knows (MatMul,
  Conv, Gather, ...), weights QUInt8 in a graph with Conv and QInt8 elsewhere, per channel, reduced
  range, `EnableSubgraph` and `MatMulConstBOnly`; int8 (`_int8`) is QInt8 everywhere and uint8
  (`_uint8`) QUInt8 everywhere;
- q4 (`_q4`): `MatMulNBitsQuantizer`, block 32, symmetric, default accuracy level;
- bnb4 (`_bnb4`): `MatMulBnb4Quantizer`, NF4, block 64;
- fp16 (`_fp16`): onnxruntime's float16 converter with `keep_io_types` (float32 inputs and
  outputs), its op block list plus RandomNormalLike, values clamped to 1e-7..1e4;
  q4f16 (`_q4f16`): q4, then fp16.
flonnx uses these folders to test that its runtime runs what users hold (tests/test_community.py)
and as the transformers.js peer in the bench.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx

from flonnx.runtime.errors import ExportError
from flonnx.runtime.folder import DTYPE_SUFFIXES, read_json
from flonnx.runtime.manifest import COMPONENTS, read_manifest, variant_files

from .onnxfile import iter_graphs
from .testmodels import original_config

COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
# transformers.js's scripts/float16.py blocks Cast and RandomNormalLike on top of onnxruntime's
# list; Cast is converted here, as before flonnx.quantize.float16 learned to move the converter's
# casts into If branches (blocking Cast broke the merged decoder: "... is not a graph input").
EXTRA_FP16_BLOCKED = ("RandomNormalLike",)


def _has_conv(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "Conv" for graph in iter_graphs(model.graph) for node in graph.node)


def _dynamic(model: onnx.ModelProto, weight_type: str) -> onnx.ModelProto:
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    if weight_type == "auto":
        weight_type = "QUInt8" if _has_conv(model) else "QInt8"
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.onnx", Path(scratch) / "out.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=getattr(QuantType, weight_type),
            op_types_to_quantize=list(IntegerOpsRegistry),
            per_channel=True,
            reduce_range=True,
            extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True},
        )
        return onnx.load(str(target))


def _q4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


def _bnb4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    quantizer = MatMulBnb4Quantizer(model, quant_type=MatMulBnb4Quantizer.NF4, block_size=64)
    quantizer.process()
    return quantizer.model.model


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    from flonnx.quantize.float16 import convert_to_float16  # with its If-branch repairs

    return convert_to_float16(
        model, [*DEFAULT_OP_BLOCK_LIST, *EXTRA_FP16_BLOCKED], max_finite=1e4, min_positive=1e-7
    )


RECIPES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "fp32": lambda model: model,
    "fp16": _fp16,
    "q8": lambda model: _dynamic(model, "auto"),
    "int8": lambda model: _dynamic(model, "QInt8"),
    "uint8": lambda model: _dynamic(model, "QUInt8"),
    "q4": _q4,
    "q4f16": lambda model: _fp16(_q4(model)),
    "bnb4": _bnb4,
}


def community_config(native: dict) -> dict:
    """onnx-community's config.json: the original layout, as transformers 4.x dumped it."""
    config = original_config(native, layout="full")
    config.pop("auto_map", None)
    config["vision_config"]["model_type"] = ""
    config["torch_dtype"] = "float32"
    return config


def make_community_folder(
    export_dir: str | Path,
    out: str | Path,
    dtypes: Iterable[str] = tuple(DTYPE_SUFFIXES),
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write `out` as onnx-community would publish `export_dir`'s model, with the given variants."""
    source, out = Path(export_dir), Path(out)
    unknown = [d for d in dtypes if d not in RECIPES]
    if unknown:
        raise ExportError(f"unknown dtype {unknown[0]!r}; expected some of: {', '.join(RECIPES)}")
    graphs = variant_files(read_manifest(source), "fp32")
    if out.exists():
        shutil.rmtree(out)
    (out / "onnx").mkdir(parents=True)
    for name in COPIED:
        shutil.copy(source / name, out / name)
    (out / "config.json").write_text(json.dumps(community_config(read_json(source, "config.json")), indent=2))
    preprocessor = read_json(source, "preprocessor_config.json")
    # theirs has the image settings and the task tables, but no parsing rules
    preprocessor.pop("post_processor_config", None)
    preprocessor["processor_class"] = "Florence2Processor"
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for component in COMPONENTS:
        for dtype in dtypes:
            progress(f"{component}: {dtype}")
            model = RECIPES[dtype](onnx.load(str(source / graphs[component])))
            onnx.save(model, str(out / "onnx" / f"{component}{DTYPE_SUFFIXES[dtype]}.onnx"))
    return out
