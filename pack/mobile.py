"""`--target mobile`: one variant of an export folder as ORT-format files for ONNX Runtime Mobile.

Each component's graph goes through onnxruntime's converter (`convert_onnx_models_to_ort`, the
"Fixed" optimization style with `--target_platform arm`): optimized at level all and saved as a
flatbuffer `.ort` file, so the phone runs no graph optimizer and a minimal build can run it. Fixed for
ARM means no NCHWc layout (an x86 kernel layout) and int8 QDQ groups allowed. The four files give one
`required_operators_and_types.config` (operators, opsets and the types each uses), the input to a
reduced onnxruntime build (`--include_ops_by_config`, `--enable_reduced_operator_type_support`).

The ORT format has no external data: every weight lives inside its graph's file, and a file holds
at most 2 GB. Tables flonnx's int8/int4 variants keep once for two graphs (the tied embedding, read
by embed_tokens' gather and the decoder's lm_head) are stored in both `.ort` files; the pack reports
that cost. `static=True` fixes the vision encoder's input to one image at the model's size
(`onnxruntime.tools.make_dynamic_shape_fixed`), for NPUs and static-shape providers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flonnx.runtime.manifest import COMPONENTS

from .folder import PackError, read_variant
from .usability import analyze, summary_line

ORT_LIMIT = 2**31 - 1  # one flatbuffer, no external data
CONFIG = "required_operators_and_types.config"
USABILITY = ("mobile_usability.json", "mobile_usability.txt")
CONVERSION = "ORT format, optimization style Fixed (level all), target platform arm"


@dataclass(frozen=True)
class MobileBuild:
    entry: dict  # component -> {"file": "ort/NAME.ort", "dtype": ...}: the pack's variant
    written: list[str]  # every file written into the pack (relative), besides the configs
    details: dict  # what goes under "pack" in flonnx.json
    converted: dict[str, Path]  # component -> the ONNX graph its .ort was made from
    scratch: Path  # work files inside the staging folder, removed before the pack moves into place


def _size(path: Path) -> int:
    return path.stat().st_size


def _fix_vision_shapes(source: Path, target: Path, model: dict) -> dict:
    """Batch 1 and the model's image size for `pixel_values`, written with its weights to `target`."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    graph_model = onnx.load(str(source))
    (pixels,) = [value for value in graph_model.graph.input if value.name == "pixel_values"]
    size = int(model["image_size"])
    shape = [1] + [d.dim_value if d.dim_value > 0 else size for d in pixels.type.tensor_type.shape.dim[1:]]
    try:
        make_input_shape_fixed(graph_model.graph, "pixel_values", shape)
        fix_output_shapes(graph_model)
    except Exception as error:  # onnx's checker and shape inference raise their own types
        raise PackError(f"cannot fix the vision encoder's shapes: {error}") from None
    # onnx cannot infer through onnxruntime's contrib operators (the int8 graph); the manifest knows
    # how many image tokens of which width come out.
    known = [1, model.get("num_image_tokens"), model.get("d_model")]
    for output in graph_model.graph.output:
        if output.name != "image_features":
            continue
        for dim, value in zip(output.type.tensor_type.shape.dim, known):
            if not dim.dim_value and value:
                dim.Clear()
                dim.dim_value = int(value)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        graph_model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
        size_threshold=1024,
    )
    return {
        value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph_model.graph.input, *graph_model.graph.output]
    }


def _convert(path: Path, out: Path, component: str) -> Path:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    chatter = io.StringIO()
    log = logging.getLogger("ort_format_model.utils")  # logs every config it writes at INFO
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(chatter):
            convert_onnx_models_to_ort(
                path,
                output_dir=out,
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform="arm",
                enable_type_reduction=True,
            )
    except Exception as error:  # onnxruntime raises its own exception types for graphs it refuses
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PackError(f"onnxruntime cannot convert {component} to the ORT format: {first}") from None
    finally:
        log.setLevel(level)
    # the converter writes a config per model; the pack has one for all four (below)
    for config in out.glob(f"{path.stem}.*.config"):
        config.unlink()
    return out / f"{path.stem}.ort"


def _write_config(ort_files: list[Path], staging: Path) -> None:
    from onnxruntime.tools.ort_format_model import create_config_from_models

    log = logging.getLogger("ort_format_model.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        create_config_from_models(ort_files, staging / CONFIG, enable_type_reduction=True)
    finally:
        log.setLevel(level)
    lines = (staging / CONFIG).read_text().splitlines()
    # the header names the files it was made from: by their place in the pack, not the staging path
    lines = [
        f"# - {Path(line[4:]).relative_to(staging)}" if line.startswith("# - ") else line for line in lines
    ]
    (staging / CONFIG).write_text("\n".join(lines) + "\n")


def read_operator_config(text: str) -> dict[str, dict[str, list[str]]]:
    """`domain -> opset -> operators` of a reduced-build config (`domain;opset;Op{types},Op,...`)."""
    found: dict[str, dict[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        domain, opset, rest = line.split(";", 2)
        ops, depth, name = [], 0, ""
        for char in rest + ",":
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            elif depth == 0 and char == ",":
                ops.append(name.strip())
                name = ""
            elif depth == 0:
                name += char
        found.setdefault(domain, {})[opset] = [op for op in ops if op]
    return found


def operator_summary(text: str) -> dict:
    config = read_operator_config(text)
    domains = {
        domain: sorted({op for ops in opsets.values() for op in ops}) for domain, opsets in config.items()
    }
    return {
        "operators": sum(len(ops) for ops in domains.values()),
        "by_domain": domains,
    }


def build(source: Path, manifest: dict, variant: str, staging: Path, static: bool, progress) -> MobileBuild:
    """Write ort/*.ort, the operator config and the usability report of `variant` into `staging`."""
    found = read_variant(source, manifest, variant, progress, "the ORT format stores it in each")
    files, reads = found.files, found.reads
    listed = manifest["variants"][variant]
    model = manifest.get("model", {})
    for component, size in reads.items():
        if size > ORT_LIMIT:
            raise PackError(
                f"{component} of variant {variant!r} holds {size / 2**30:.2f} GiB; an ORT-format file "
                f"keeps every weight inside itself and holds at most 2 GiB: pack a smaller variant"
            )

    work = staging / ".work"
    inputs = {c: source / files[c] for c in COMPONENTS}
    fixed = {}
    if static:
        inputs["vision_encoder"] = work / "static" / Path(files["vision_encoder"]).name
        fixed["vision_encoder"] = _fix_vision_shapes(
            source / files["vision_encoder"], inputs["vision_encoder"], model
        )
        progress(f"vision_encoder: fixed shapes {fixed['vision_encoder']}")

    ort_dir = staging / "ort"
    ort_files = {}
    progress(f"converting to the {CONVERSION}")
    for component in COMPONENTS:
        name = f"ort/{inputs[component].stem}.ort"
        progress(f"{component}: {files[component]} -> {name}")
        ort_files[component] = _convert(inputs[component], ort_dir, component)
        if _size(ort_files[component]) > ORT_LIMIT:
            raise PackError(f"{name} is larger than 2 GiB, the ORT format's limit")

    progress(f"operators and types of the four graphs -> {CONFIG}")
    _write_config(list(ort_files.values()), staging)
    operators = operator_summary((staging / CONFIG).read_text())

    findings, texts = {}, []
    for component in COMPONENTS:
        findings[component], text = analyze(inputs[component], work / "usability")
        texts.append(text)
        progress(f"usability: {summary_line(component, findings[component])}")
    (staging / USABILITY[0]).write_text(json.dumps(findings, indent=2) + "\n")
    (staging / USABILITY[1]).write_text("\n".join(texts))

    pack_sizes = {c: _size(ort_files[c]) for c in COMPONENTS}
    details = {
        "format": CONVERSION,
        "static": fixed or None,
        "sizes": {
            "source_variant": found.source_bytes,
            "pack_graphs": sum(pack_sizes.values()),
            "per_component": {c: {"source_reads": reads[c], "ort": pack_sizes[c]} for c in COMPONENTS},
        },
        "shared_tables": found.shared,
        "duplicated_bytes": found.duplicated,
        "operators": {"config": CONFIG, **operators},
        "usability": {"json": USABILITY[0], "text": USABILITY[1]},
    }
    entry = {
        component: {"file": f"ort/{ort_files[component].name}", "dtype": listed[component].get("dtype")}
        for component in COMPONENTS
    }
    written = [*(entry[c]["file"] for c in COMPONENTS), CONFIG, *USABILITY]
    return MobileBuild(entry, written, details, inputs, work)
