"""Draw task results (boxes, quads, polygons and their labels) onto a copy of the image."""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image, ImageDraw

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#008080")


def _shapes(answer) -> Iterable[tuple[str, str, list[float]]]:
    """(kind, label, flat coordinates) for every shape in one task's answer."""
    if not isinstance(answer, dict):
        return
    for key, kind, labels_key in (
        ("bboxes", "box", "labels"),
        ("bboxes", "box", "bboxes_labels"),
        ("quad_boxes", "polygon", "labels"),
        ("polygons", "polygons", "labels"),
        ("polygons", "polygons", "polygons_labels"),
    ):
        if key in answer and labels_key in answer:
            for shape, label in zip(answer[key], answer[labels_key]):
                if kind == "polygons":
                    for polygon in shape:
                        yield "polygon", label, polygon
                else:
                    yield kind, label, shape


def draw_results(image: Image.Image, results: Iterable[dict]) -> Image.Image:
    """A copy of `image` with every shape of `results` (dicts of {task: answer}) drawn and labelled."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    index = 0
    for result in results:
        for answer in result.values():
            for kind, label, coords in _shapes(answer):
                color = PALETTE[index % len(PALETTE)]
                index += 1
                if kind == "box" and len(coords) == 4:
                    # Models can emit x2 < x1; PIL wants the corners in order.
                    x1, y1, x2, y2 = coords
                    box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
                    draw.rectangle(box, outline=color, width=width)
                    anchor = box[:2]
                elif len(coords) >= 6:
                    points = list(zip(coords[0::2], coords[1::2]))
                    draw.polygon(points, outline=color, width=width)
                    anchor = points[0]
                else:
                    continue
                if label:
                    left, top, right, bottom = draw.textbbox(anchor, label)
                    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=color)
                    draw.text(anchor, label, fill="white")
    return canvas
