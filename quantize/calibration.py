"""The calibration set the quantize report measures on: synthetic images drawn in code, and tasks.

The images are drawn deterministically (no binaries in the repository); `--images` replaces them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flonnx.runtime.preprocess import ImageInput, load_image


@dataclass(frozen=True)
class CalibrationTask:
    task: str
    text: str | None = None


# A caption (text), a detector (locations) and a grounding task (text input -> locations).
CALIBRATION_TASKS = (
    CalibrationTask("<CAPTION>"),
    CalibrationTask("<OD>"),
    CalibrationTask("<CAPTION_TO_PHRASE_GROUNDING>", "a red circle"),
)


def _shapes(seed: int, size: tuple[int, int]) -> Image.Image:
    """A gradient background with coloured rectangles, ellipses and polygons."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    pixels = top * (1 - y) + bottom * y + 30 * np.sin(6 * x)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, 0.8) * width, rng.uniform(0, 0.8) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.3) * width, y0 + rng.uniform(0.1, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=colour)
    return image


def _document(seed: int, size: tuple[int, int]) -> Image.Image:
    """Dark lines of text on a light page, with a boxed title: something to read."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, (245, 243, 236))
    draw = ImageDraw.Draw(image)
    words = ["flonnx", "florence", "onnx", "int8", "model", "vision", "decoder", "token", "image", "text"]
    draw.rectangle((20, 20, width - 20, 70), outline=(20, 20, 120), width=3)
    draw.text((30, 35), "QUANTIZATION REPORT", fill=(20, 20, 120))
    for row, top in enumerate(range(90, height - 20, 22)):
        line = " ".join(rng.choice(words, size=6))
        draw.text((30, top), f"{row + 1:2d}. {line}", fill=(30, 30, 30))
    return image


def calibration_images() -> list[tuple[str, Image.Image]]:
    """The shipped calibration images, as (name, RGB image)."""
    return [("shapes", _shapes(0, (640, 480))), ("document", _document(1, (480, 640)))]


def load_images(images: Sequence[ImageInput] | None) -> list[tuple[str, Image.Image]]:
    """`images` (paths, or anything the runtime's loader takes) named for the report, or the
    shipped calibration images when None or empty."""
    if not images:
        return calibration_images()
    named = []
    for index, image in enumerate(images):
        name = Path(image).name if isinstance(image, (str, os.PathLike)) else f"image-{index}"
        named.append((name, load_image(image)))
    return named
