"""Synthetic scenes whose truth is known: coloured shapes and a short word on a varied background.

Each scene comes with the answers Florence-2 gives in its reference format, task by task, so a model
trained on these scenes can be scored through any backend (PyTorch, each ONNX variant). A scene
depends only on `(seed, index)`: training and evaluation draw from disjoint seeds.

Objects sit on a grid of 20 cells per axis (multiples of 50 location bins), so that few distinct
`<loc_N>` tokens are needed; images are 200-280 px wide and high, not always square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .prompts import quantize

__all__ = [
    "COLORS",
    "GRID",
    "SHAPES",
    "TASKS",
    "WORDS",
    "Example",
    "Scene",
    "SceneObject",
    "Word",
    "caption",
    "examples",
    "make_scene",
    "scene_mask",
    "shape_polygon",
]

GRID = 20  # cells per axis; a cell is 50 location bins
SIZES = (200, 240, 280)  # image width and height in pixels, multiples of GRID
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = (
    "cat", "dog", "sun", "box", "hello", "onnx", "test", "moon", "tree", "fish", "bird", "star",
    "book", "lamp", "ship", "rain", "snow", "fire", "wind", "road", "milk", "gold", "map", "key",
)  # fmt: skip
TASKS = (
    "<CAPTION>",
    "<OD>",
    "<OCR>",
    "<OCR_WITH_REGION>",
    "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>",
    "<REGION_TO_CATEGORY>",
)
CIRCLE_POINTS = 8
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # pixels x1, y1, x2, y2 on the grid

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Word:
    text: str
    box: tuple[int, int, int, int]  # the grid-aligned box the word is centred in

    @property
    def quad(self) -> list[int]:
        x1, y1, x2, y2 = self.box
        return [x1, y1, x2, y1, x2, y2, x1, y2]


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    objects: tuple[SceneObject, ...]  # left to right
    word: Word | None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True)
class Example:
    """One task on a scene: the runtime's request (task, text, region) and the reference output."""

    task: str
    text: str | None
    region: str | None
    target: str  # the generated text between `<s>` and `</s>`


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A pale plain, gradient or speckled background: never close to a shape's colour."""
    base = rng.uniform(200, 250, size=3)
    style = rng.integers(3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if style == 1:
        other = rng.uniform(200, 250, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
        pixels = pixels * (1 - t[..., None]) + other * t[..., None]
    elif style == 2:
        pixels = pixels + rng.normal(0, 6, size=(height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The outline of a shape inscribed in `box`, clockwise from the top-left (circles: an octagon)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "circle":
        rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
        angles = [math.pi * (-0.75 + 2 * k / CIRCLE_POINTS) for k in range(CIRCLE_POINTS)]
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]
    raise ValueError(f"unknown shape {shape!r}, expected one of: {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon(shape_polygon(obj.shape, (x1, y1, x2 - 1, y2 - 1)), fill=fill)


def scene_mask(obj: SceneObject, size: tuple[int, int]) -> np.ndarray:
    """The object's true pixels as a boolean [H, W] mask."""
    mask = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(mask), obj, 255)
    return np.asarray(mask) > 0


def _free(occupied: np.ndarray, x: int, y: int, w: int, h: int) -> bool:
    # One empty cell around each thing, so that boxes never touch.
    return not occupied[max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1].any()


def _place(rng: np.random.Generator, occupied: np.ndarray, w: int, h: int) -> tuple[int, int] | None:
    spots = [(x, y) for y in range(1, GRID - h) for x in range(1, GRID - w) if _free(occupied, x, y, w, h)]
    if not spots:
        return None
    x, y = spots[rng.integers(len(spots))]
    occupied[y : y + h, x : x + w] = True
    return x, y


def make_scene(
    seed: int, index: int, min_objects: int = 1, max_objects: int = 3, word_probability: float = 0.5
) -> Scene:
    """Scene `index` of the stream `seed`: 1-3 shapes of distinct colour-and-shape, maybe a word."""
    rng = _rng(seed, index)
    width, height = (int(v) for v in rng.choice(SIZES, size=2))
    cell_w, cell_h = width // GRID, height // GRID
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    occupied = np.zeros((GRID, GRID), dtype=bool)

    word = None
    if rng.random() < word_probability:
        text = str(rng.choice(WORDS))
        h = 3
        w = len(text) + 1  # about 0.6 of a 3-cell-high font per letter
        spot = _place(rng, occupied, w, h)
        if spot is not None:
            x, y = spot
            box = (x * cell_w, y * cell_h, (x + w) * cell_w, (y + h) * cell_h)
            font = _font(int(0.8 * h * cell_h))
            ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=ink, font=font, anchor="mm")
            word = Word(text, box)

    count = int(rng.integers(min_objects, max_objects + 1))
    kinds = [(s, c) for s in SHAPES for c in COLORS]
    picks = rng.choice(len(kinds), size=count, replace=False)
    objects = []
    for pick in picks:
        shape, color = kinds[pick]
        size = int(rng.integers(3, 8))
        spot = _place(rng, occupied, size, size)
        if spot is None:
            continue
        x, y = spot
        box = (x * cell_w, y * cell_h, (x + size) * cell_w, (y + size) * cell_h)
        obj = SceneObject(shape, color, box)
        jitter = rng.integers(-15, 16, size=3)
        _draw_shape(draw, obj, tuple(int(v) for v in np.clip(np.add(COLORS[color], jitter), 0, 255)))
        objects.append(obj)
    objects.sort(key=lambda o: (o.box[0], o.box[1]))
    return Scene(image, tuple(objects), word)


def caption(scene: Scene) -> str:
    """The objects left to right: "a red circle, a blue square and an orange triangle"."""
    phrases = [_article(o.name) for o in scene.objects]
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _locs(values, image_size: tuple[int, int]) -> str:
    return "".join(f"<loc_{b}>" for b in quantize(list(values), image_size))


def _polygon_locs(points, image_size: tuple[int, int]) -> str:
    return _locs([v for point in points for v in point], image_size)


def examples(scene: Scene) -> list[Example]:
    """Every task this scene has an answer for, with the reference output."""
    size = scene.size
    objects = scene.objects
    out = [
        Example("<CAPTION>", None, None, caption(scene)),
        Example("<OD>", None, None, "".join(o.shape + _locs(o.box, size) for o in objects)),
    ]
    if scene.word is not None:
        out.append(Example("<OCR>", None, None, scene.word.text))
        out.append(Example("<OCR_WITH_REGION>", None, None, scene.word.text + _locs(scene.word.quad, size)))
    out.append(
        Example(
            "<CAPTION_TO_PHRASE_GROUNDING>",
            caption(scene),
            None,
            "".join(_article(o.name) + _locs(o.box, size) for o in objects),
        )
    )
    for o in objects:
        polygon = _polygon_locs(shape_polygon(o.shape, o.box), size)
        out.append(Example("<REFERRING_EXPRESSION_SEGMENTATION>", f"the {o.name}", None, polygon))
        out.append(Example("<REGION_TO_CATEGORY>", None, _locs(o.box, size), o.name))
    return out


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name
