"""Florence-2 answers with boxes or polygons as a COCO detection dataset (one per task).

Boxes [x1, y1, x2, y2] become COCO's [x, y, width, height]; polygons (flat [x, y, x, y, ...] lists,
several per instance) and OCR quad boxes become `segmentation` polygons, with `bbox` their bounds
and `area` the polygon area. Categories are the answers' labels, sorted, with ids from 1; an empty
label (region proposals, referring segmentation) takes the task's text input, else "object".
Polygons of fewer than 3 points cannot be COCO polygons and are left out (the JSONL keeps them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_CATEGORY = "object"


def instances(answer: Any, fallback: str) -> list[tuple[str, list[float], list[list[float]]]]:
    """(label, bbox [x, y, w, h], segmentation polygons) for each box, quad or polygon in an answer."""
    if not isinstance(answer, dict):
        return []
    found = []

    def name(labels: Sequence[str], index: int) -> str:
        label = labels[index].strip() if index < len(labels) else ""
        return label or fallback

    for key, labels_key in (("bboxes", "labels"), ("bboxes", "bboxes_labels")):
        if key in answer and labels_key in answer:
            labels = answer[labels_key]
            for index, (x1, y1, x2, y2) in enumerate(answer[key]):
                box = _xywh([x1, x2], [y1, y2])
                found.append((name(labels, index), box, []))
    if "quad_boxes" in answer:
        for index, quad in enumerate(answer["quad_boxes"]):
            found.append((name(answer.get("labels", []), index), _bounds([quad]), [list(quad)]))
    for key, labels_key in (("polygons", "labels"), ("polygons", "polygons_labels")):
        if key in answer and labels_key in answer:
            labels = answer[labels_key]
            for index, polygons in enumerate(answer[key]):
                kept = [list(p) for p in polygons if len(p) >= 6 and len(p) % 2 == 0]
                if kept:
                    found.append((name(labels, index), _bounds(kept), kept))
    return found


def _xywh(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _bounds(polygons: Iterable[Sequence[float]]) -> list[float]:
    xs = [x for p in polygons for x in p[0::2]]
    ys = [y for p in polygons for y in p[1::2]]
    return _xywh(xs, ys)


def polygon_area(polygon: Sequence[float]) -> float:
    """The shoelace area of a flat [x, y, x, y, ...] polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    twice = sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))
    return abs(twice) / 2


def to_coco(records: Sequence[dict], task: str, fallback: str, description: str) -> dict:
    """The COCO dict of `task`'s answers in label records (in order: image ids follow it)."""
    per_image = [instances(record["answers"].get(task), fallback) for record in records]
    names = sorted({label for found in per_image for label, _, _ in found})
    category_ids = {label: number for number, label in enumerate(names, 1)}
    images, annotations = [], []
    for image_id, (record, found) in enumerate(zip(records, per_image), 1):
        images.append(
            {
                "id": image_id,
                "file_name": record["path"],
                "width": record["width"],
                "height": record["height"],
            }
        )
        for label, bbox, segmentation in found:
            area = sum(polygon_area(p) for p in segmentation) if segmentation else bbox[2] * bbox[3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": bbox,
                    "area": area,
                    "segmentation": segmentation,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": label, "supercategory": ""} for label, i in category_ids.items()],
    }
