"""Agreement of each onnx-community dtype with fp32 on the synthetic model (README's table).

The shipped synthetic model is written as an original-format checkpoint, exported by flonnx, made
into an onnx-community folder with transformers.js's recipes (`flonnx.export.community`), and every
dtype answers the same held-out scenes as fp32:

    python tools/community_report.py [--scenes 50] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"
IMAGE_SIZE = 160
SEED = 12345  # the held-out stream of README's synthetic table
TASKS = ("<CAPTION>", "<OD>", "<OCR>", "<CAPTION_TO_PHRASE_GROUNDING>")


def build(work: Path) -> Path:
    from transformers import Florence2ForConditionalGeneration

    from flonnx.export import testmodels
    from flonnx.export.community import make_community_folder
    from flonnx.export.exporter import Progress, export

    folder = work / "onnx-community"
    if folder.is_dir():
        return folder
    model = Florence2ForConditionalGeneration.from_pretrained(SHIPPED, dtype="float32").eval()
    original = testmodels.save_original(
        testmodels.native_for_original(model), work / "original", image_size=IMAGE_SIZE
    )
    config = json.loads((original / "config.json").read_text())
    config["text_config"].update(num_beams=1, no_repeat_ngram_size=0)  # the shipped model's settings
    (original / "config.json").write_text(json.dumps(config))
    export(str(original), work / "export", image_size=IMAGE_SIZE, force=True, progress=Progress())
    return make_community_folder(work / "export", folder, progress=lambda m: print(m, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    from flonnx.export.community import RECIPES
    from flonnx.runtime.model import Florence2, Request
    from flonnx.runtime.synthetic import caption, make_scene

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--work", type=Path, help="reuse this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="flonnx-community-"))
    folder = build(work)
    requests = []
    for index in range(args.scenes):
        scene = make_scene(SEED, index)
        for task in TASKS:
            text = caption(scene) if task == "<CAPTION_TO_PHRASE_GROUNDING>" else None
            requests.append(Request(scene.image, task, text))
    warnings.simplefilter("ignore")
    results, seconds = {}, {}
    for dtype in RECIPES:
        model = Florence2.load(folder, variant=dtype, threads=2)
        started = time.perf_counter()
        results[dtype] = model.run_batch(requests)
        seconds[dtype] = time.perf_counter() - started
    size = {
        dtype: sum(p.stat().st_size for p in (folder / "onnx").glob(f"*{suffix}.onnx") if _is(p, suffix))
        for dtype, suffix in _suffixes().items()
    }
    reference = results["fp32"]
    print(f"{args.scenes} synthetic scenes (seed {SEED}) x {len(TASKS)} tasks = {len(requests)} requests")
    print("| dtype | answers equal to fp32 | tokens equal to fp32 | graphs MB | run s |")
    print("|---|---|---|---|---|")
    for dtype, answers in results.items():
        same = sum(a.as_dict() == r.as_dict() for a, r in zip(answers, reference))
        tokens = sum(a.tokens == r.tokens for a, r in zip(answers, reference))
        print(
            f"| {dtype} | {same}/{len(requests)} ({same / len(requests):.1%}) | {tokens / len(requests):.1%} "
            f"| {size[dtype] / 1e6:.1f} | {seconds[dtype]:.1f} |"
        )
    return 0


def _suffixes() -> dict[str, str]:
    from flonnx.runtime.folder import DTYPE_SUFFIXES

    return DTYPE_SUFFIXES


def _is(path: Path, suffix: str) -> bool:
    """True when `path` is a graph of exactly this suffix (fp32's empty suffix matches no other)."""
    from flonnx.runtime.manifest import COMPONENTS

    return any(path.name == f"{component}{suffix}.onnx" for component in COMPONENTS)


if __name__ == "__main__":
    sys.exit(main())
