"""What NNAPI (Android) and CoreML (iOS) could take of each graph: onnxruntime's mobile usability
checker (`python -m onnxruntime.tools.check_onnx_model_mobile_usability MODEL`), called through its
Python functions so the pack keeps the numbers (JSON) as well as the checker's own text.

As the command does, each ONNX graph is first optimized at onnxruntime's basic level, then checked
per execution provider: which nodes have an operator the provider supports, which of those are
blocked only because an input has a dynamic shape, and into how many partitions the supported nodes
fall (every partition boundary is a copy between CPU and accelerator; the checker's verdict is NO
beyond two partitions). It then asks again as if every shape were fixed, which is what
`flonnx pack --static` (or a fixed-shape export) can offer.

Where onnx's shape inference stops at an onnxruntime contrib operator (`GatherBlockQuantized` in the
int8 embed_tokens) it leaves no shapes at all, and the command fails on such a graph ("Run
onnx.shape_inference.infer_shapes ..."); here the as-is check is reported as not possible and only
the fixed-shape check is given.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

# Provider -> (the checker function's name, the supported-operators table it reads).
PROVIDERS = {
    "NNAPI": ("check_nnapi_partitions", None),
    "CoreML NeuralNetwork": ("check_coreml_partitions", "coreml_supported_neuralnetwork_ops.md"),
    "CoreML MLProgram": ("check_coreml_partitions", "coreml_supported_mlprogram_ops.md"),
}


def _dims(value) -> list:
    return [
        d.dim_param or (d.dim_value if d.dim_value > 0 else "?") for d in value.type.tensor_type.shape.dim
    ]


def _summary(info) -> dict:
    return {
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "partitions": info.num_partitions,
        "unsupported_ops": sorted(info.unsupported_ops),
        "blocked_by_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
        "verdict": info.suitability().name,
    }


def _check(checker, provider: str, model, fixed_only: bool):
    function, table = PROVIDERS[provider]
    arguments = (model, fixed_only) if table is None else (model, fixed_only, table)
    return getattr(checker, function)(*arguments)


def analyze(path: Path, work: Path) -> tuple[dict, str]:
    """The checker's findings for one ONNX graph (with its external data beside it), as a dict and
    as the text the command prints. `work` is a scratch folder for the optimized copy."""
    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as checker
    from onnxruntime.tools.onnx_model_utils import optimize_model

    text = io.StringIO()
    logger = logging.getLogger(f"flonnx.pack.usability.{id(text)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(text)
    logger.addHandler(handler)
    scratch = work / path.stem
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        optimized = scratch / path.name
        optimize_model(path, optimized, use_external_initializers=True)
        model = onnx.load(str(optimized), load_external_data=False)  # shapes need no weights
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        logger.info(f"{path.name}: basic optimizations, then onnxruntime's mobile usability checker")
        dynamic_inputs, dynamic_values = checker.check_shapes(model.graph, logger)
        result: dict = {
            "dynamic_inputs": {value.name: _dims(value) for value in dynamic_inputs},
            "dynamic_values": dynamic_values,
            "providers": {},
        }
        shapes_known = bool(model.graph.value_info) or len(model.graph.node) <= 1
        for provider in PROVIDERS:
            logger.info(f"Checking {provider}")
            entry: dict = {}
            if shapes_known:
                as_is = _check(checker, provider, model, True)
                as_is.print_analysis(logger, provider)
                entry = _summary(as_is)
                logger.info(f"Model should perform well with {provider} as is: {entry['verdict']}")
            else:
                entry = {"verdict": None, "note": "onnx shape inference stops at a contrib operator"}
                logger.info("As is: not checked (onnx shape inference stops at a contrib operator)")
            if dynamic_inputs or not shapes_known:
                fixed = _check(checker, provider, model, False)
                logger.info("If the dynamic shapes were fixed:")
                fixed.print_analysis(logger, provider)
                entry["with_fixed_shapes"] = _summary(fixed)
                logger.info(
                    f"Model should perform well with {provider} with fixed shapes: "
                    f"{entry['with_fixed_shapes']['verdict']}"
                )
            result["providers"][provider] = entry
            logger.info("")
        return result, text.getvalue()
    finally:
        logger.removeHandler(handler)
        shutil.rmtree(scratch, ignore_errors=True)


def summary_line(component: str, result: dict) -> str:
    """`vision_encoder: NNAPI 507/1232 nodes in 79 partitions (NO; fixed shapes: ...)`, one provider
    per clause."""
    parts = []
    for provider, entry in result["providers"].items():
        fixed = entry.get("with_fixed_shapes")
        if entry.get("verdict") is None:
            now = "as is: unknown shapes"
        else:
            now = f"{entry['supported_nodes']}/{entry['nodes']} nodes in {entry['partitions']} partitions"
            now += f" ({entry['verdict']})"
        if fixed:
            now += f", fixed shapes {fixed['supported_nodes']}/{fixed['nodes']} ({fixed['verdict']})"
        parts.append(f"{provider} {now}")
    return f"{component}: " + "; ".join(parts)
