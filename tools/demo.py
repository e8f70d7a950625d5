"""`make demo`: build the tiny random Florence-2, export it, and run tasks through `flonnx run`.

The tiny model has random weights, so its captions are nonsense and its boxes arbitrary: the demo
shows the whole pipeline working offline, not a model's skill. Real checkpoints go through the
same commands (see README).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TASKS = ["<CAPTION>", "<OD>", "<OCR_WITH_REGION>", "<REFERRING_EXPRESSION_SEGMENTATION>"]


def scene(path: Path) -> None:
    """A small synthetic scene: shapes and a word on a plain background."""
    image = Image.new("RGB", (480, 320), "#dfe8f0")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 170, 190), fill="#d03030")
    draw.rectangle((220, 120, 380, 260), fill="#3050c0")
    draw.polygon([(400, 40), (460, 150), (340, 150)], fill="#30a050")
    draw.text((60, 250), "flonnx", fill="black")
    image.save(path)


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/demo", help="working folder (default artifacts/demo)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the model and the export")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, export = out / "tiny-checkpoint", out / "tiny-onnx"
    if args.fresh:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)
    flonnx = str(Path(sys.executable).with_name("flonnx"))

    if not (checkpoint / "config.json").is_file():
        print(f"building the tiny random Florence-2 checkpoint in {checkpoint}", flush=True)
        from flonnx.export.testmodels import save_model

        save_model("tiny", checkpoint, seed=1, loc_scale=2.0)
    if not (export / "flonnx.json").is_file():
        run([flonnx, "export", str(checkpoint), str(export), "--force"])
    image = out / "scene.png"
    scene(image)
    command = [flonnx, "run", str(export), str(image), "--max-new-tokens", "40", "--verbose"]
    for task in TASKS:
        command += ["--task", task]
    run([*command, "--text", "the red circle", "--draw", str(out / "scene-drawn.png")])
    print(f"\nexport folder: {export}\ndrawn results: {out / 'scene-drawn.png'}")
    print("(random weights: the answers are arbitrary; the pipeline is what this shows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
