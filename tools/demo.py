"""`make demo`: export the shipped synthetic-scene Florence-2, quantize it, run tasks through `flonnx run`.

The shipped model (export/data/synthetic-florence2, trained by tools/train_synthetic.py) is a small
Florence-2 that knows coloured shapes and short words: its answers on the shipped sample scene are
real ones, drawn onto PNGs. Real checkpoints go through the same commands (see README).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from flonnx.runtime import synthetic

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "export" / "data" / "synthetic-florence2"
SAMPLE = ROOT / "export" / "data" / "synthetic-sample.png"
IMAGE_SIZE = "160"
# (name of the drawing, tasks, text input): one `flonnx run` each.
RUNS = (
    ("detection", ["<CAPTION>", "<OD>", "<OCR_WITH_REGION>"], None),
    ("grounding", ["<CAPTION_TO_PHRASE_GROUNDING>"], "caption"),
    ("segmentation", ["<REFERRING_EXPRESSION_SEGMENTATION>"], "first object"),
)


def run(command: list[str], capture: bool = False, allowed: tuple[int, ...] = (0,)) -> str:
    print("$", " ".join(f"'{c}'" if " " in c or "<" in c else c for c in command), flush=True)
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode not in allowed:
        raise SystemExit(f"demo: {command[1]} failed with exit status {result.returncode}")
    if capture:
        print(result.stdout, end="", flush=True)
    return result.stdout if capture else ""


def first_object(caption: str | None) -> str:
    """ "red circle" from "a red circle, an orange square and ..." (the model's own caption)."""
    first = (caption or "").split(",")[0].split(" and ")[0].split()
    return " ".join(first[1:]) if len(first) > 1 else "red circle"


def quantize_available() -> bool:
    try:
        return importlib.util.find_spec("flonnx.quantize.cli") is not None
    except ModuleNotFoundError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/demo", help="working folder (default artifacts/demo)")
    parser.add_argument("--fresh", action="store_true", help="redo the export and the quantization")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = out / "synthetic-onnx"
    if args.fresh:
        shutil.rmtree(export, ignore_errors=True)
    flonnx = str(Path(sys.executable).with_name("flonnx"))

    if not (export / "flonnx.json").is_file():
        run([flonnx, "export", str(CHECKPOINT), str(export), "--image-size", IMAGE_SIZE, "--force"])
    variants = json.loads((export / "flonnx.json").read_text())["variants"]
    variant = "fp32"
    if quantize_available():
        if not any("8" in v for v in variants):
            # The report compares int8 with fp32 on scenes of the kind the model knows.
            scenes = []
            for i in range(4):
                scenes.append(out / f"calibration-{i}.png")
                synthetic.make_scene(777, i).image.save(scenes[-1])
            # Exit status 1: written, but the report flagged it (shown above); the demo goes on.
            run(
                [flonnx, "quantize", str(export), "--recipe", "int8", "--images", *map(str, scenes)],
                allowed=(0, 1),
            )
            variants = json.loads((export / "flonnx.json").read_text())["variants"]
        variant = next((v for v in variants if v != "fp32" and "8" in v), "fp32")
    else:
        print("(the quantize stage is not installed: running the fp32 graphs)", flush=True)

    image = out / "sample.png"
    shutil.copyfile(SAMPLE, image)
    base = [flonnx, "run", str(export), str(image), "--variant", variant]
    caption = None
    drawn = []
    for name, tasks, text in RUNS:
        command = [*base, *(a for t in tasks for a in ("--task", t))]
        if text == "caption":
            text = caption or "a red circle"
        elif text == "first object":
            text = "the " + first_object(caption)
        if text:
            command += ["--text", text]
        path = out / f"sample-{name}.png"
        lines = run([*command, "--draw", str(path)], capture=True)
        drawn.append(path)
        for line in lines.splitlines():
            answer = json.loads(line)
            if "<CAPTION>" in answer:
                caption = answer["<CAPTION>"]
    print(f"\nexport folder: {export} (variant {variant})")
    print("drawn results: " + ", ".join(str(p) for p in drawn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
