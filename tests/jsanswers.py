"""transformers.js's Florence-2 answers against flonnx's: what "the same answer" means between them.

transformers.js returns bin-centre float coordinates ((bin + 0.5) * size / 1000) where transformers
and flonnx truncate them to ints, so coordinates are compared through their bins; it has no polygon
parsing (`post_process_generation` throws on "polygons" tasks), so there only the generated tokens
are compared.
"""

from __future__ import annotations

import pytest

from flonnx.runtime.postprocess import dequantize
from flonnx.runtime.prompts import NUM_BINS

POLYGON_TASKS = {"<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"}


def bins(values: list[float], size: tuple[int, int]) -> list[int]:
    """The location bins of transformers.js's bin-centre coordinates (x, y, x, y, ...)."""
    found = []
    for i, value in enumerate(values):
        extent = size[i % 2]
        index = round(value * NUM_BINS / extent - 0.5)
        assert value == pytest.approx((index + 0.5) * extent / NUM_BINS, abs=1e-9), (value, extent)
        found.append(index)
    return found


def same_answer(theirs, ours, size: tuple[int, int]) -> bool:
    if isinstance(ours, str) or isinstance(theirs, str):
        return theirs == ours
    if set(theirs) != set(ours) or theirs["labels"] != ours["labels"]:
        return False
    key = "quad_boxes" if "quad_boxes" in ours else "bboxes"
    if len(theirs[key]) != len(ours[key]):
        return False
    return all(dequantize(bins(t, size), size) == o for t, o in zip(theirs[key], ours[key]))


def difference(request: dict, their: dict, our) -> str | None:
    """None where transformers.js answered `request` ({image: Path, task, text, size}) as flonnx did
    (`our`: a flonnx Result); else what differs."""
    where = f"{request['image'].name} {request['task']} {request['text']!r}"
    if their["ids"] != our.tokens or their["text"] != our.text:
        return f"{where}: transformers.js generated {their['text']!r}, flonnx {our.text!r}"
    if request["task"] in POLYGON_TASKS:
        assert "not yet implemented" in their["error"], their  # its documented limit
        return None
    if "error" in their:
        return f"{where}: transformers.js failed: {their['error']}"
    if not same_answer(their["answer"], our.answer, request["size"]):
        return f"{where}: transformers.js answered {their['answer']!r}, flonnx {our.answer!r}"
    return None
