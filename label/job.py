"""What a labelling job computes (`Job`), and one batch of images labelled with it (`label_batch`).

Both backends, the local pool and Ray, call `label_batch` with the same job, so an image gets the
same answer wherever it runs (fp32 graphs answer the same in any batch, see `Florence2.run_batch`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flonnx.runtime.errors import FlonnxError, ImageError, InputError
from flonnx.runtime.folder import default_variant, read_json, select
from flonnx.runtime.manifest import MANIFEST, read_manifest
from flonnx.runtime.model import Florence2, Request
from flonnx.runtime.preprocess import load_image
from flonnx.runtime.prompts import TaskTable, build_prompt

# Answers of these kinds carry boxes or polygons: each such task gets a COCO file.
GEOMETRY_KINDS = frozenset(
    {
        "ocr",
        "description_with_bboxes",
        "phrase_grounding",
        "bboxes",
        "polygons",
        "description_with_polygons",
        "description_with_bboxes_or_polygons",
    }
)


@dataclass(frozen=True)
class Job:
    """The settings an answer depends on. A resumed run must have the same ones (see writers.py)."""

    source: str  # SRC, resolved
    model: str  # the model folder, resolved
    tasks: tuple[str, ...]
    variant: str | dict[str, str] | None = None
    text: str | None = None
    region: tuple[float, ...] | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }

    def inputs(self, task: str, table: TaskTable) -> tuple[str | None, tuple[float, ...] | None]:
        """(text, region) for `task`, as `flonnx run` passes them: a region task takes --region, or
        --text holding <loc_> tokens; a text task takes --text; the others take nothing."""
        if task not in table.prompts_with_input:
            return None, None
        region = self.region if task in table.region_tasks else None
        return (self.text if region is None else None), region

    def requests(self, image: Any, table: TaskTable) -> list[Request]:
        return [Request(image, task, *self.inputs(task, table)) for task in self.tasks]


def task_table(model: Path) -> TaskTable:
    """The model folder's tasks, read without loading its graphs."""
    return TaskTable.from_config(read_json(model, "preprocessor_config.json"))


def make_job(
    source: str | os.PathLike,
    model: str | os.PathLike,
    tasks: Sequence[str],
    *,
    variant: str | Mapping[str, str] | None = None,
    text: str | None = None,
    region: Sequence[float] | None = None,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
) -> tuple[Job, TaskTable]:
    """A checked job and the model's task table. Bad tasks or inputs fail here, before any image."""
    model = Path(model)
    if not model.is_dir():
        raise InputError(f"model folder {model} not found: pass an export folder (flonnx export)")
    table = task_table(model)
    # An unknown variant fails here, naming the available ones, rather than in every worker.
    manifest = read_manifest(model) if (model / MANIFEST).is_file() else None
    select(model, manifest, default_variant(manifest) if variant is None else variant)
    if isinstance(tasks, str) or not tasks:
        raise InputError(f"pass one or more tasks, e.g. ['<OD>'], got {tasks!r}")
    for task in tasks:
        if task not in table.tasks:
            raise InputError(f"unknown task {task!r}, expected one of: {', '.join(table.tasks)}")
    twice = sorted({task for task in tasks if list(tasks).count(task) > 1})
    if twice:
        raise InputError(f"task {', '.join(twice)} given twice")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if region is not None:
        try:
            box = tuple(float(v) for v in region)
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4:
            raise InputError(f"region must be four numbers x1, y1, x2, y2 in pixels, got {region!r}")
        region = box
    job = Job(
        source=str(Path(source).resolve()),
        model=str(model.resolve()),
        tasks=tuple(tasks),
        variant=dict(variant) if isinstance(variant, Mapping) else variant,
        text=text,
        region=region,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    _check_inputs(job, table)
    return job, table


def _check_inputs(job: Job, table: TaskTable) -> None:
    """--text and --region used by some task, and every task given what it needs (as `flonnx run`)."""
    table.check_inputs(job.tasks, job.text, job.region)
    for task in job.tasks:
        text, region = job.inputs(task, table)
        # A prompt that cannot be built would fail on every image: fail once, now.
        build_prompt(task, text, region, (1000, 1000), table)


def coco_tasks(job: Job, table: TaskTable) -> list[str]:
    return [task for task in job.tasks if table.post_processing_type(task) in GEOMETRY_KINDS]


def error_record(key: str, reason: str) -> dict:
    return {"path": key, "error": reason}


def read_image_bytes(path: Path) -> bytes | str:
    """The file's bytes, or why they cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"


def label_batch(model: Florence2, job: Job, items: Sequence[tuple[str, bytes | str]]) -> list[dict]:
    """One record per (key, image bytes or a read error): {"path", "width", "height", "answers":
    {task: answer}}, or {"path", "error"} for an image that cannot be used."""
    records: dict[str, dict] = {}
    loaded = []
    for key, data in items:
        if isinstance(data, str):
            records[key] = error_record(key, data)
            continue
        try:
            loaded.append((key, load_image(data)))
        except ImageError as error:
            records[key] = error_record(key, str(error))
    if loaded:
        try:
            answers = _answers(model, job, loaded)
        except FlonnxError:
            # One image must not cost the others their labels: run each alone to find it.
            answers = {}
            for key, image in loaded:
                try:
                    answers.update(_answers(model, job, [(key, image)]))
                except FlonnxError as error:
                    records[key] = error_record(key, str(error))
        for key, image in loaded:
            if key in answers:
                width, height = image.size
                records[key] = {"path": key, "width": width, "height": height, "answers": answers[key]}
    return [records[key] for key, _ in items]


def _answers(model: Florence2, job: Job, loaded: Sequence[tuple[str, Any]]) -> dict[str, dict]:
    requests = [request for _, image in loaded for request in job.requests(image, model.tasks)]
    results = model.run_batch(requests, max_new_tokens=job.max_new_tokens, num_beams=job.num_beams)
    per_image = len(job.tasks)
    return {
        key: {result.task: result.answer for result in results[i * per_image : (i + 1) * per_image]}
        for i, (key, _) in enumerate(loaded)
    }
