"""A pack is the same model in another file format: it must compute what the source variant computes
on the device. Before a pack is moved into place, both are loaded as users load them
(`Florence2.load`) and run on one synthetic scene with a few tasks, greedy.

What "the same" can mean on the packing machine: onnxruntime on x86 rewrites convolutions into its
NCHWc layout (`NchwcTransformer`), which ARM builds do not apply and which the converter leaves out
for `--target_platform arm`. The source's vision encoder therefore runs other convolution kernels
here than the pack's, float sums in another order (~2e-6 apart on the tiny model's fp32 features);
through the int8 vision encoder's dynamic activation quantization, such differences flip quantization
steps (0.02 apart). With `--static`, fixed shapes also let the optimizer fold the shape arithmetic and
fuse Conv+Add and MatMul+Add (FusedConv, Gemm): sums in another order again (tiny model: fp32 1.5e-6,
int8 0.014). So the check asks:
- vision: the pack's features against the graph it was converted from (the source's, or its
  fixed-shape copy) run without the x86 layout, as an ARM device runs it (must be equal); against
  the source graph run so, and as flonnx runs it here (reported);
- text: the answers of pack and source given the same image features (must be equal);
- end to end on this machine, each with its own features (reported).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CHECK_TASKS = (
    ("<CAPTION>", None),
    ("<OD>", None),
    ("<OCR>", None),
    ("<CAPTION_TO_PHRASE_GROUNDING>", "a red circle"),
)
SCENE = (20260, 0)  # synthetic scene (seed, index)
MAX_NEW_TOKENS = 32
VISION_TOLERANCE = 1e-5  # max abs diff of the features against the source run as on ARM
X86_LAYOUT = "NchwcTransformer"


def _load(folder: Path, variant: str, threads: int | None):
    from flonnx.runtime.model import Florence2

    started = time.perf_counter()
    # Sizes only: the source was hashed before packing and the pack's hashes were just computed.
    model = Florence2.load(folder, variant=variant, threads=threads, verify="size")
    return model, time.perf_counter() - started


def _as_on_arm(path: Path, pixels: np.ndarray, threads: int | None) -> np.ndarray:
    """A vision graph on this machine, without onnxruntime's x86-only conv layout."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=[X86_LAYOUT]
    )
    return session.run(None, {"pixel_values": pixels})[0][0]


def compare(
    source: Path,
    variant: str,
    pack: Path,
    pack_variant: str,
    converted: Path,
    threads: int | None = None,
    *,
    tasks=CHECK_TASKS,
    image=None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    """The pack against the source variant (see the module's docstring). `converted`: the ONNX
    vision graph the pack's was made from; `image` defaults to a synthetic scene."""
    from flonnx.runtime.model import Request
    from flonnx.runtime.preprocess import load_image
    from flonnx.runtime.synthetic import make_scene

    scene = list(SCENE) if image is None else None
    image = make_scene(*SCENE).image if image is None else image
    original, source_load = _load(source, variant, threads)
    packed, pack_load = _load(pack, pack_variant, threads)
    features = packed.encode_image(image)
    here = original.encode_image(image)
    pixels = original.preprocessor([load_image(image)]).pixel_values
    source_graph = source / original.manifest["variants"][variant]["vision_encoder"]["file"]
    as_on_arm = {"converted_as_on_arm": _as_on_arm(converted, pixels, threads)}
    as_on_arm["source_as_on_arm"] = (
        as_on_arm["converted_as_on_arm"]
        if converted.resolve() == source_graph.resolve()
        else _as_on_arm(source_graph, pixels, threads)
    )

    def answers(model, item):
        requests = [Request(item, task, text) for task, text in tasks]
        return model.run_batch(requests, max_new_tokens=max_new_tokens, num_beams=1)

    expected, found = answers(original, features), answers(packed, features)
    differ = [a.task for a, b in zip(expected, found) if a.tokens != b.tokens or a.answer != b.answer]
    own = answers(original, here)
    end_to_end = sum(a.tokens == b.tokens and a.answer == b.answer for a, b in zip(own, found))
    return {
        "scene": scene,
        "tasks": [task for task, _ in tasks],
        "decoding": f"greedy, at most {max_new_tokens} new tokens",
        "equal": len(expected) - len(differ),
        "total": len(expected),
        "differ": differ,
        "vision_max_abs_diff": {
            **{name: float(np.abs(features.features - value).max()) for name, value in as_on_arm.items()},
            "source_here": float(np.abs(features.features - here.features).max()),
        },
        "end_to_end_equal_here": end_to_end,
        "load_seconds": {"source": round(source_load, 3), "pack": round(pack_load, 3)},
    }


def passed(check: dict) -> bool:
    vision = check["vision_max_abs_diff"]["converted_as_on_arm"]
    return check["equal"] == check["total"] and vision <= VISION_TOLERANCE


def check_line(check: dict) -> str:
    vision = check["vision_max_abs_diff"]
    line = f"answers equal given the same image features: {check['equal']}/{check['total']}"
    if check["differ"]:
        line += f" (differ: {', '.join(check['differ'])})"
    line += (
        f"; vision features (max abs diff): the converted graph as on ARM {vision['converted_as_on_arm']:.2g}"
    )
    if vision["source_as_on_arm"] != vision["converted_as_on_arm"]:
        line += f", the source's as on ARM {vision['source_as_on_arm']:.2g}"
    line += (
        f", the source's here (x86 conv layout) {vision['source_here']:.2g};"
        f" end to end here: {check['end_to_end_equal_here']}/{check['total']}"
        f"; load {check['load_seconds']['pack']:.2f} s (source {check['load_seconds']['source']:.2f} s)"
    )
    return line
