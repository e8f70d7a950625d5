"""What a client may send to POST /v1/run, and its checking into a `Job` the engine can run.

Two encodings of the same fields: multipart/form-data (files under `image`, repeatable `task`,
the rest as form fields) and JSON (images as base64 strings). Every check happens before the job
is queued, so a bad request costs no batch slot and is answered with the value at fault and what
is valid: 400 for bytes that are not an image or not JSON, 413 for too much, 422 for values the
model cannot take (messages from flonnx.runtime where it has them).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flonnx.runtime import Florence2
from flonnx.runtime.errors import ImageError, InputError
from flonnx.runtime.preprocess import load_image
from flonnx.runtime.prompts import build_prompt, check_length, prompt_ids

from .cache import content_key
from .settings import ServeSettings

# Decoding options a request may set; None keeps the model folder's generation_config.json.
GENERATION_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "length_penalty",
    "temperature",
    "top_k",
    "top_p",
)


class ServeError(Exception):
    """An answer other than 200, with the sentence the client sees."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="capped by the server's max_new_tokens")
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1, description="1: greedy; default: generation_config.json")
    do_sample: bool | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="with do_sample: the same seed, the same answer")
    scores: bool = Field(False, description='add per-box "scores" to answers with boxes')
    timeout_s: float | None = Field(None, gt=0, description="answer within this many seconds or 504")


class TaskItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description='a task token, e.g. "<OD>"')
    text: str | None = None
    region: list[float] | str | None = Field(None, description="x1,y1,x2,y2 in pixels, or four <loc_N>")


class RunFields(RunOptions):
    task: str | None = Field(None, description="one task token; or use tasks")
    tasks: list[str | TaskItem] | None = Field(
        None, description="task tokens, or objects with their own input"
    )
    text: str | None = Field(None, description="input of the tasks that take text (phrase grounding, ...)")
    region: list[float] | str | None = Field(
        None, description="x1,y1,x2,y2 in pixels for the REGION_TO_* tasks, or four <loc_N> tokens"
    )


class RunBody(RunFields):
    """The JSON form of POST /v1/run."""

    image: str | None = Field(None, description="base64 image bytes (a data: URL prefix is accepted)")
    images: list[str] | None = Field(None, description="several base64 images; every task runs on each")


@dataclass(frozen=True)
class RawJob:
    images: list[bytes]
    fields: RunFields


@dataclass(frozen=True)
class DecodedImage:
    key: str  # SHA-256 of the bytes: the feature cache's key
    image: Image.Image


@dataclass(frozen=True)
class TaskSpec:
    task: str
    text: str | None
    region: str | tuple[float, ...] | None


@dataclass(frozen=True)
class Job:
    images: tuple[DecodedImage, ...]
    tasks: tuple[TaskSpec, ...]
    options: tuple[tuple[str, Any], ...]  # run_batch keyword arguments, sorted: the batching key
    timeout_s: float
    sampled: bool  # sampled rows run alone: their random streams depend on the batch

    @property
    def rows(self) -> int:
        return len(self.images) * len(self.tasks)


# -- body -> RawJob ------------------------------------------------------------------------------


def describe_validation(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        value = item.get("input")
        shown = "" if isinstance(value, dict) or item["type"] == "missing" else f" (got {_short(value)})"
        parts.append(f"{where}: {item['msg']}{shown}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_json(body: bytes) -> RawJob:
    try:
        parsed = RunBody.model_validate_json(body)
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            raise ServeError(400, f"the body is not valid JSON: {describe_validation(error)}") from None
        raise ServeError(422, describe_validation(error)) from None
    encoded = ([parsed.image] if parsed.image is not None else []) + (parsed.images or [])
    if parsed.image is not None and parsed.images:
        raise ServeError(422, "send either image or images, not both")
    fields = RunFields.model_validate(parsed.model_dump(exclude={"image", "images"}, exclude_unset=True))
    return RawJob([_base64_image(text, i) for i, text in enumerate(encoded)], fields)


def _base64_image(text: str, index: int) -> bytes:
    if text.startswith(("http://", "https://", "ftp://", "file:")):
        raise ServeError(
            400, f"images[{index}] is a URL: this server does not fetch URLs; send the image bytes as base64"
        )
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ServeError(400, f"images[{index}] is a data: URL that is not base64 ({header[:40]!r})")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"images[{index}] is not valid base64 ({len(text)} characters)") from None


def parse_form(files: list[bytes], values: dict[str, Any]) -> RawJob:
    """Multipart fields as strings (tasks as a list); pydantic converts '8' and 'true'."""
    region = values.get("region")
    if isinstance(region, str) and "<loc_" not in region:
        parts = region.replace(" ", "").split(",")
        try:
            values["region"] = [float(p) for p in parts]
        except ValueError:
            raise ServeError(
                422, f"region must be x1,y1,x2,y2 in pixels or four <loc_N> tokens, got {region!r}"
            ) from None
    try:
        return RawJob(files, RunFields.model_validate(values))
    except ValidationError as error:
        raise ServeError(422, describe_validation(error)) from None


# -- RawJob -> Job -------------------------------------------------------------------------------


def prepare(model: Florence2, settings: ServeSettings, raw: RawJob) -> Job:
    """Decode and check everything; CPU work, so the app runs it in a thread."""
    fields = raw.fields
    if not raw.images:
        raise ServeError(
            422, "no image: send a file under 'image' (multipart) or base64 'image'/'images' (JSON)"
        )
    if len(raw.images) > settings.max_images:
        raise ServeError(
            413, f"{len(raw.images)} images in one request; this server takes at most {settings.max_images}"
        )
    specs = _task_specs(model, fields)
    if len(specs) > settings.max_tasks:
        raise ServeError(
            413, f"{len(specs)} tasks in one request; this server takes at most {settings.max_tasks}"
        )
    rows = len(raw.images) * len(specs)
    if rows > settings.queue_size:
        raise ServeError(
            413,
            f"{len(raw.images)} images x {len(specs)} tasks = {rows} rows, more than the whole queue "
            f"({settings.queue_size}): split the request",
        )
    options, sampled = _run_options(model, settings, fields)
    images = tuple(_decode(data, i, settings.max_pixels) for i, data in enumerate(raw.images))
    for decoded in images:
        for spec in specs:
            _check_prompt(model, spec, decoded.image.size)
    timeout = settings.deadline_s if fields.timeout_s is None else min(fields.timeout_s, settings.deadline_s)
    return Job(images, tuple(specs), options, timeout, sampled)


def _task_specs(model: Florence2, fields: RunFields) -> list[TaskSpec]:
    """Each task with its input, as `flonnx run` gives --text and --region to the tasks that take them."""
    table = model.tasks
    if fields.task is not None and fields.tasks:
        raise ServeError(422, "send either task or tasks, not both")
    items = [fields.task] if fields.task is not None else list(fields.tasks or [])
    if not items:
        raise ServeError(422, f"no task: send task (or tasks), one of: {', '.join(table.tasks)}")
    region_tasks = [t for t in table.tasks if t in table.region_tasks]
    text_tasks = [t for t in table.prompts_with_input if t not in table.region_tasks]
    region = _region(fields.region)
    specs, text_used, region_used = [], False, False
    for item in items:
        if isinstance(item, TaskItem):
            specs.append(TaskSpec(item.task, item.text, _region(item.region)))
            continue
        if item not in table.tasks:
            raise ServeError(422, f"unknown task {item!r}, expected one of: {', '.join(table.tasks)}")
        takes_input = item in table.prompts_with_input
        task_region = region if takes_input and item in table.region_tasks else None
        text = fields.text if takes_input and task_region is None else None
        text_used |= text is not None
        region_used |= task_region is not None
        specs.append(TaskSpec(item, text, task_region))
    chosen = ", ".join(s.task for s in specs)
    if fields.text is not None and not text_used:
        raise ServeError(
            422,
            f"text {fields.text!r} is not used by {chosen}; tasks that take text: {', '.join(text_tasks)}",
        )
    if region is not None and not region_used:
        raise ServeError(
            422, f"region is not used by {chosen}; tasks that take a region: {', '.join(region_tasks)}"
        )
    return specs


def _region(value: list[float] | str | None) -> str | tuple[float, ...] | None:
    return tuple(value) if isinstance(value, list) else value


def _run_options(model: Florence2, settings: ServeSettings, fields: RunFields) -> tuple[tuple, bool]:
    given = {name: getattr(fields, name) for name in GENERATION_FIELDS if getattr(fields, name) is not None}
    if given.get("max_new_tokens", 0) > settings.max_new_tokens:
        raise ServeError(
            422,
            f"max_new_tokens {given['max_new_tokens']} is more than this server allows "
            f"(at most {settings.max_new_tokens})",
        )
    try:
        effective = model.generation_options(**given)
    except InputError as error:
        raise ServeError(422, str(error)) from None
    if effective.num_beams > settings.max_num_beams:
        raise ServeError(
            422,
            f"num_beams {effective.num_beams} is more than this server allows "
            f"(at most {settings.max_num_beams})",
        )
    # An explicit length for every request, so requests that leave it out batch together.
    given["max_new_tokens"] = min(effective.max_new_tokens, settings.max_new_tokens)
    run = {**given, "scores": fields.scores}
    if fields.seed is not None:
        run["seed"] = fields.seed
    return tuple(sorted(run.items())), effective.do_sample


def _decode(data: bytes, index: int, max_pixels: int) -> DecodedImage:
    try:
        size = _header_size(data)
    except ServeError as error:
        raise ServeError(error.status, f"image {index}: {error.message}") from None
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        raise ServeError(
            413,
            f"image {index} is {width}x{height} = {width * height:,} pixels; "
            f"this server takes at most {max_pixels:,} pixels per image",
        )
    try:
        image = load_image(data, max_pixels=max_pixels)
    except ImageError as error:
        raise ServeError(400, f"image {index}: {error}") from None
    return DecodedImage(content_key(data), image)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone; None when Pillow cannot read it (load_image says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Image.DecompressionBombError as error:
        raise ServeError(413, f"image too large: {error}") from None
    except Exception:  # load_image reads it again and says what is wrong
        return None


def _check_prompt(model: Florence2, spec: TaskSpec, image_size: tuple[int, int]) -> None:
    try:
        prompt = build_prompt(spec.task, spec.text, spec.region, image_size, model.tasks)
        check_length(len(prompt_ids(model.tokenizer, prompt)), model.num_image_tokens, model.max_positions)
    except InputError as error:
        raise ServeError(422, str(error)) from None
