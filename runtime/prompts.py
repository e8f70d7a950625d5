"""Florence-2 task tokens, the English prompts they stand for, and the prompt's token ids.

Everything here reproduces `transformers`' `Florence2Processor` (`_construct_prompts`,
`prepare_inputs_layout`) and `Florence2PostProcessor.quantize` without torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, ModelFolderError, PromptError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_POST_PROCESSING_TYPES",
    "DEFAULT_PROMPTS_WITHOUT_INPUT",
    "DEFAULT_PROMPTS_WITH_INPUT",
    "DEFAULT_REGION_TASKS",
    "DEFAULT_TABLE",
    "EOS_TOKEN",
    "MAX_POSITIONS",
    "NUM_BINS",
    "TaskTable",
    "build_prompt",
    "check_length",
    "prompt_ids",
    "quantize",
    "region_tokens",
]

# Copied from Florence2Processor.__init__ (transformers 5.x); the key order matters: the reference
# looks task tokens up in this order.
DEFAULT_PROMPTS_WITHOUT_INPUT: Mapping[str, str] = MappingProxyType(
    {
        "<OCR>": "What is the text in the image?",
        "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
        "<CAPTION>": "What does the image describe?",
        "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
        "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
        "<OD>": "Locate the objects with category name in the image.",
        "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
        "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
    }
)
DEFAULT_PROMPTS_WITH_INPUT: Mapping[str, str] = MappingProxyType(
    {
        "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
        "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
        "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
        "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
        "<REGION_TO_CATEGORY>": "What is the region {input}?",
        "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
        "<REGION_TO_OCR>": "What text is in the region {input}?",
    }
)
DEFAULT_POST_PROCESSING_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "<OCR>": "pure_text",
        "<OCR_WITH_REGION>": "ocr",
        "<CAPTION>": "pure_text",
        "<DETAILED_CAPTION>": "pure_text",
        "<MORE_DETAILED_CAPTION>": "pure_text",
        "<OD>": "description_with_bboxes",
        "<DENSE_REGION_CAPTION>": "description_with_bboxes",
        "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
        "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
        "<REGION_TO_SEGMENTATION>": "polygons",
        "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
        "<REGION_TO_CATEGORY>": "pure_text",
        "<REGION_TO_DESCRIPTION>": "pure_text",
        "<REGION_TO_OCR>": "pure_text",
        "<REGION_PROPOSAL>": "bboxes",
    }
)
# Tasks whose input is a box given as four location tokens rather than free text.
DEFAULT_REGION_TASKS: frozenset[str] = frozenset(
    {"<REGION_TO_SEGMENTATION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>"}
)

NUM_BINS = 1000  # location bins per axis: <loc_0> .. <loc_999>
MAX_POSITIONS = 1024  # the BART text encoder's max_position_embeddings
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# preprocessor_config.json keys, as the exporter writes them (the processor's attribute names).
_CONFIG_KEYS = {
    "prompts_without_input": "task_prompts_without_inputs",
    "prompts_with_input": "task_prompts_with_input",
    "post_processing_types": "tasks_answer_post_processing_type",
}
_LOC_REGION = re.compile(r"(?:<loc_(?:0|[1-9]\d{0,2})>){4}")


def _frozen(mapping: Mapping[str, str], key: str) -> Mapping[str, str]:
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ModelFolderError(f"'{key}' must map task tokens to strings, got {mapping!r}")
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class TaskTable:
    """The task tokens a checkpoint knows: their prompts and how their answers are parsed."""

    # The mappings are read-only views; they stay out of the hash (mapping proxies are unhashable).
    prompts_without_input: Mapping[str, str] = field(
        default_factory=lambda: DEFAULT_PROMPTS_WITHOUT_INPUT, hash=False
    )
    prompts_with_input: Mapping[str, str] = field(
        default_factory=lambda: DEFAULT_PROMPTS_WITH_INPUT, hash=False
    )
    post_processing_types: Mapping[str, str] = field(
        default_factory=lambda: DEFAULT_POST_PROCESSING_TYPES, hash=False
    )
    region_tasks: frozenset[str] = DEFAULT_REGION_TASKS

    def __post_init__(self) -> None:
        for name, key in _CONFIG_KEYS.items():
            object.__setattr__(self, name, _frozen(getattr(self, name), key))
        object.__setattr__(self, "region_tasks", frozenset(self.region_tasks))
        for task, template in self.prompts_with_input.items():
            try:
                ok = "\0" in template.format(input="\0")
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise ModelFolderError(
                    f"the prompt of {task} must contain '{{input}}' and no other braces, got {template!r}"
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TaskTable:
        """The table in a `preprocessor_config.json` dict; a missing key keeps its built-in default."""
        tables = {name: config[key] for name, key in _CONFIG_KEYS.items() if key in config}
        with_input = tables.get("prompts_with_input", DEFAULT_PROMPTS_WITH_INPUT)
        region_tasks = frozenset(t for t in DEFAULT_REGION_TASKS if t in with_input)
        return cls(**tables, region_tasks=region_tasks)

    def to_config(self) -> dict[str, dict[str, str]]:
        """The `preprocessor_config.json` entries that `from_config` reads back."""
        return {key: dict(getattr(self, name)) for name, key in _CONFIG_KEYS.items()}

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task token that `build_prompt` accepts, without-input tasks first."""
        return (*self.prompts_without_input, *self.prompts_with_input)

    def check_inputs(self, tasks: Sequence[str], text: str | None, region) -> None:
        """Every task known, and `text` / `region` used by at least one of `tasks` (as transformers'
        processor, which refuses text after a task that takes none, rather than ignoring it)."""
        for task in tasks:
            if task not in self.tasks:
                raise InputError(f"unknown task {task!r}, expected one of: {', '.join(self.tasks)}")
        region_tasks = [t for t in self.tasks if t in self.region_tasks]
        text_tasks = [t for t in self.prompts_with_input if t not in self.region_tasks]
        chosen = ", ".join(tasks)
        if text is not None and not any(t in text_tasks or t in region_tasks for t in tasks):
            raise InputError(
                f"--text {text!r} is not used by {chosen}: it takes no input; "
                f"tasks that take text: {', '.join(text_tasks)}"
            )
        if region is not None and not any(t in region_tasks for t in tasks):
            raise InputError(
                f"--region is not used by {chosen}; tasks that take a region: {', '.join(region_tasks)}"
            )

    def post_processing_type(self, task: str) -> str:
        # Florence2Processor.post_process_generation treats a task it does not know as pure text.
        return self.post_processing_types.get(task, "pure_text")


DEFAULT_TABLE = TaskTable()


def quantize(values: Sequence[float], image_size: tuple[float, float]) -> list[int]:
    """Pixel coordinates (x, y, x, y, ...) to location bins, as `Florence2PostProcessor.quantize`.

    The reference computes in float32 (the dtype of `torch.tensor(box)`):
    `floor(x / float32(W / 1000))` clamped to 0..999, and likewise for y with H.
    """
    width, height = image_size
    coords = np.asarray(values, dtype=np.float64).astype(np.float32).reshape(-1, 2)
    per_bin = np.array([width / NUM_BINS, height / NUM_BINS], dtype=np.float32)
    bins = np.clip(np.floor(coords / per_bin), 0, NUM_BINS - 1)
    return [int(b) for b in bins.astype(np.int32).ravel()]


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_image_size(image_size: object) -> tuple[float, float]:
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in image_size)
    ):
        raise PromptError(f"image_size must be (width, height) in pixels, both > 0, got {image_size!r}")
    return float(image_size[0]), float(image_size[1])


def region_tokens(region: str | Sequence[float], image_size: tuple[float, float] | None = None) -> str:
    """A region as Florence-2 reads it: `<loc_x1><loc_y1><loc_x2><loc_y2>`.

    `region` is either that string already (checked, returned stripped) or a pixel box
    `[x1, y1, x2, y2]` inside an image of `image_size=(width, height)`.
    """
    if isinstance(region, str):
        tokens = region.strip()
        if not _LOC_REGION.fullmatch(tokens):
            raise PromptError(
                f"a region must be four location tokens '<loc_x1><loc_y1><loc_x2><loc_y2>' "
                f"(each 0..{NUM_BINS - 1}, nothing in between), got {region!r}"
            )
        return tokens
    try:
        box = list(region)
    except TypeError:
        box = []
    if len(box) != 4 or not all(_is_number(v) and math.isfinite(v) for v in box):
        raise PromptError(f"a region box must be four numbers [x1, y1, x2, y2] in pixels, got {region!r}")
    if image_size is None:
        raise PromptError(f"a pixel box {box} needs image_size=(width, height) to be turned into locations")
    width, height = _check_image_size(image_size)
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise PromptError(
            f"region box {box} is not inside the image of size {image_size!r} (width, height): "
            f"expected 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height"
        )
    return "".join(f"<loc_{b}>" for b in quantize(box, image_size))


def build_prompt(
    task: str,
    text: str | None = None,
    region: str | Sequence[float] | None = None,
    image_size: tuple[float, float] | None = None,
    table: TaskTable = DEFAULT_TABLE,
) -> str:
    """The English prompt Florence-2 gets for `task`, as `Florence2Processor` builds it from `task + text`.

    Tasks in `table.region_tasks` take a region (`region=`, or a location-token string as `text=`),
    the other with-input tasks take free text, the rest take nothing.
    """
    if text is not None and not isinstance(text, str):
        raise PromptError(f"text must be a string, got {type(text).__name__} {text!r}")
    if task not in table.prompts_without_input and task not in table.prompts_with_input:
        raise PromptError(f"unknown task {task!r}, expected one of: {', '.join(table.tasks)}")
    if task in table.prompts_without_input:
        if text or region is not None:
            given = f"text={text!r}" if text else f"region={region!r}"
            raise PromptError(f"task {task} takes no input, got {given}")
        return table.prompts_without_input[task]

    template = table.prompts_with_input[task]
    if task in table.region_tasks:
        if text and region is not None:
            raise PromptError(f"task {task} takes one region, got both text={text!r} and region={region!r}")
        value = region if region is not None else text
        if value is None or (isinstance(value, str) and not value.strip()):
            raise PromptError(
                f"task {task} needs a region: region='<loc_x1><loc_y1><loc_x2><loc_y2>' "
                f"or region=[x1, y1, x2, y2] in pixels with image_size=(width, height)"
            )
        return template.format(input=region_tokens(value, image_size))

    if region is not None:
        regional = ", ".join(t for t in table.tasks if t in table.region_tasks)
        raise PromptError(f"task {task} takes text, not a region (tasks that take a region: {regional})")
    if text is None or not text.strip():
        raise PromptError(f"task {task} needs text input, got {text!r}")
    # The reference finds task tokens by substring anywhere in `task + text` (and raises or rewrites the
    # prompt when the text holds one), so text that contains a task token has no sensible prompt.
    inner = [t for t in table.tasks if t in text]
    if inner:
        raise PromptError(f"the text of task {task} must not contain a task token, found {', '.join(inner)}")
    return template.format(input=text.strip())


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The text part of the encoder input, `<s>` prompt `</s>` (the image features come before it)."""
    return tokenizer.encode(BOS_TOKEN + prompt + EOS_TOKEN, add_special_tokens=False).ids


def check_length(n_text_tokens: int, n_image_tokens: int, max_positions: int = MAX_POSITIONS) -> None:
    """Raise PromptError when image + text tokens do not fit the text encoder's positions."""
    total = n_text_tokens + n_image_tokens
    if total > max_positions:
        raise PromptError(
            f"the prompt is too long: {n_image_tokens} image tokens + {n_text_tokens} text tokens = {total}, "
            f"more than the {max_positions} positions of the text encoder; "
            f"at most {max_positions - n_image_tokens} text tokens fit"
        )
