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


def same_answers(
    source: Path,
    variant: str,
    pack: Path,
    pack_variant: str,
    threads: int | None = None,
    *,
    tasks=CHECK_TASKS,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    """A pack whose graphs are the source's, stored otherwise (the web target), against the source:
    the same image features and the same answers, end to end, on this machine."""
    from flonnx.runtime.model import Request
    from flonnx.runtime.synthetic import make_scene

    image = make_scene(*SCENE).image
    original, source_load = _load(source, variant, threads)
    packed, pack_load = _load(pack, pack_variant, threads)
    ours, theirs = original.encode_image(image), packed.encode_image(image)
    requests = [(task, text) for task, text in tasks]
    expected = original.run_batch(
        [Request(ours, *r) for r in requests], max_new_tokens=max_new_tokens, num_beams=1
    )
    found = packed.run_batch(
        [Request(theirs, *r) for r in requests], max_new_tokens=max_new_tokens, num_beams=1
    )
    differ = [a.task for a, b in zip(expected, found) if a.tokens != b.tokens or a.answer != b.answer]
    graphs = [
        folder / model.manifest["variants"][name]["embed_tokens"]["file"]
        for folder, model, name in ((source, original, variant), (pack, packed, pack_variant))
    ]
    return {
        "scene": list(SCENE),
        "tasks": [task for task, _ in tasks],
        "decoding": f"greedy, at most {max_new_tokens} new tokens",
        "equal": len(expected) - len(differ),
        "total": len(expected),
        "differ": differ,
        "vision_max_abs_diff": float(np.abs(ours.features - theirs.features).max()),
        "embed_max_abs_diff": _embedding_difference(*graphs, threads),
        "load_seconds": {"source": round(source_load, 3), "pack": round(pack_load, 3)},
    }


def _embedding_difference(source: Path, pack: Path, threads: int | None, chunk: int = 8192) -> float:
    """Max abs diff of two embed_tokens graphs over every id of the vocabulary."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 1
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (source, pack)
    ]
    rows = sessions[0].get_inputs()[0]
    vocabulary = _vocabulary_rows(source)
    worst = 0.0
    for start in range(0, vocabulary, chunk):
        ids = np.arange(start, min(start + chunk, vocabulary), dtype=np.int64)[None, :]
        a, b = (session.run(None, {rows.name: ids})[0] for session in sessions)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def _vocabulary_rows(graph: Path) -> int:
    """The rows of the embedding table the graph reads (its largest initializer's first dimension)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return max(
        (list(t.dims) for t in model.graph.initializer if len(t.dims) == 2), key=lambda d: d[0] * d[1]
    )[0]


def same_answers_passed(check: dict) -> bool:
    return (
        check["equal"] == check["total"]
        and check["vision_max_abs_diff"] == 0.0
        and check.get("embed_max_abs_diff", 0.0) == 0.0
    )


def same_answers_line(check: dict) -> str:
    line = f"answers equal to the source variant's: {check['equal']}/{check['total']}"
    if check["differ"]:
        line += f" (differ: {', '.join(check['differ'])})"
    return (
        f"{line}; max abs diff: vision features {check['vision_max_abs_diff']:.2g}, embeddings of the "
        f"whole vocabulary {check['embed_max_abs_diff']:.2g}"
        f"; load {check['load_seconds']['pack']:.2f} s (source {check['load_seconds']['source']:.2f} s)"
    )
