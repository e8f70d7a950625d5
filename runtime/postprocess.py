"""Generated text to task results: a torch-free port of `transformers`' Florence-2 post-processing.

`post_process(text, task, image_size, config)` returns what
`Florence2Processor.post_process_generation(text=text, task=task, image_size=image_size)` returns, to the
last int: same keys, same order, same values. The reference's quirks are kept on purpose, see the
comments marked "reference:".
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, ModelFolderError
from .prompts import BOS_TOKEN, DEFAULT_TABLE, NUM_BINS, TaskTable

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DEFAULT_POST_PROCESSOR_CONFIG",
    "POST_PROCESSING_TYPES",
    "decode_generated",
    "decode_sequence",
    "dequantize",
    "post_process",
    "post_process_sequence",
]

_OCR_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8
# The original processor's built-in parsing rules (transformers' conversion script writes the same
# into native checkpoints); used where a folder's preprocessor_config.json has none, as
# onnx-community's do. The pronoun-like phrases (duplicates included) are dropped from grounding.
BANNED_GROUNDING_TOKENS = (
    "it, I, me, mine, you, your, yours, he, him, his, she, her, hers, they, them, their, theirs, "
    "one, oneself, we, us, our, ours, you, your, yours, they, them, their, theirs, mine, yours, his, "
    "hers, its, ours, yours, theirs, myself, yourself, himself, herself, itself, ourselves, "
    "yourselves, themselves, this, that, these, those, who, whom, whose, which, what, who, whom, "
    "whose, which, that, all, another, any, anybody, anyone, anything, each, everybody, everyone, "
    "everything, few, many, nobody, none, one, several, some, somebody, someone, something, "
    "each other, one another, myself, yourself, himself, herself, itself, ourselves, yourselves, "
    "themselves, the image, image, images, the, a, an, a group, other objects, lots, a set"
).split(", ")
DEFAULT_POST_PROCESSOR_CONFIG = {
    "ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": BANNED_GROUNDING_TOKENS},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

_PHRASE_WITH_BOXES = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_BOXES_ONLY = re.compile(r"(?:(?:<loc_\d+>){4,})")
_PHRASE = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_POLYGON_PHRASE = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_LOC = re.compile(r"<loc_(\d+)>")
_FIRST_LOC = re.compile(r"^<loc_\d+>")


def _strip_specials(text: str) -> str:
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


def dequantize(bins: Sequence[int], image_size: tuple[float, float]) -> list[int]:
    """Location bins (x, y, x, y, ...) to pixels, as `Florence2PostProcessor.dequantize`.

    reference: `torch.tensor(bins)` is int64, `+ 0.5` makes it float32 (torch's default dtype), the
    python-float bin size is cast to float32, and `.int()` truncates toward zero.
    """
    width, height = image_size
    per_bin = np.array([width / NUM_BINS, height / NUM_BINS], dtype=np.float32)
    centres = np.asarray(bins, dtype=np.int64).reshape(-1, 2).astype(np.float32) + np.float32(0.5)
    return (centres * per_bin).astype(np.int32).ravel().tolist()


def _parse_ocr(text: str, image_size, pattern: str | None = None, area_threshold: float = 0.0) -> list[dict]:
    text = _strip_specials(text)
    width, height = image_size
    instances = []
    for content, *quad_str in re.findall(_OCR_PATTERN if pattern is None else pattern, text):
        quad_box = dequantize([int(i) for i in quad_str], image_size)
        if area_threshold > 0:
            xs, ys = quad_box[0::2], quad_box[1::2]
            # reference: a shoelace formula over 3 of the 4 edges (the closing edge is left out).
            area = 0.5 * abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(4 - 1)))
            if area < (width * height) * area_threshold:
                continue
        instances.append({"quad_box": quad_box, "text": content.strip()})
    return instances


def _phrase_boxes(phrase_text: str, image_size) -> list[list[int]]:
    bins = [int(g) for m in _BOX.finditer(phrase_text) for g in m.groups()]
    flat = dequantize(bins, image_size)
    return [flat[i : i + 4] for i in range(0, len(flat), 4)]


def _parse_phrase_grounding(text: str, image_size, banned: frozenset[str]) -> list[dict]:
    instances = []
    for phrase_text in _PHRASE_WITH_BOXES.findall(_strip_specials(text)):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text:
            continue
        match = _PHRASE.search(phrase_text)
        if not match:
            continue
        phrase = match.group().strip()
        # reference: the banned list is checked before non-ASCII characters are dropped.
        if phrase in banned:
            continue
        bboxes = _phrase_boxes(phrase_text, image_size)
        if not bboxes:
            continue
        phrase = phrase.encode("ascii", "ignore").decode("ascii")
        instances.append({"bbox": bboxes, "cat_name": phrase})
    return instances


def _parse_bboxes(text: str, image_size, allow_empty_phrase: bool = False) -> list[dict]:
    pattern = _BOXES_ONLY if allow_empty_phrase else _PHRASE_WITH_BOXES
    instances = []
    for phrase_text in pattern.findall(_strip_specials(text)):
        phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text and not allow_empty_phrase:
            continue
        match = _PHRASE.search(phrase_text)
        if not match:
            continue
        phrase = match.group().strip()
        bboxes = _phrase_boxes(phrase_text, image_size)
        if not bboxes:
            continue
        phrase = phrase.encode("ascii", "ignore").decode("ascii")
        instances.extend({"bbox": bbox, "cat_name": phrase} for bbox in bboxes)
    return instances


def _parse_polygons(
    text: str,
    image_size,
    allow_empty_phrase: bool = False,
    polygon_sep_token: str = "<sep>",
    polygon_start_token: str = "<poly>",
    polygon_end_token: str = "</poly>",
    with_box_at_start: bool = False,
) -> list[dict]:
    sep, start, end = (re.escape(t) for t in (polygon_sep_token, polygon_start_token, polygon_end_token))
    if allow_empty_phrase:
        pattern = rf"(?:(?:<loc_\d+>|{sep}|{start}|{end}){{4,}})"
    else:
        pattern = rf"([^<]+(?:<loc_\d+>|{sep}|{start}|{end}){{4,}})"
    poly_instance_pattern = re.compile(rf"{start}(.*?){end}")
    box_pattern = re.compile(rf"((?:<loc_\d+>)+)(?:{sep}|$)")

    instances = []
    for phrase_text in re.findall(pattern, _strip_specials(text)):
        phrase_text_strip = _FIRST_LOC.sub("", phrase_text, count=1)
        if not phrase_text_strip and not allow_empty_phrase:
            continue
        match = _POLYGON_PHRASE.search(phrase_text_strip)
        if not match:
            continue
        # reference: unlike boxes, polygon labels keep their non-ASCII characters.
        phrase = match.group().strip()

        if polygon_start_token in phrase_text and polygon_end_token in phrase_text:
            poly_instances = [m.group(1) for m in poly_instance_pattern.finditer(phrase_text)]
        else:
            poly_instances = [phrase_text]

        for poly_inst in poly_instances:
            poly_matches = list(box_pattern.finditer(poly_inst))
            if not poly_matches:
                continue
            bbox: list[int] = []
            polygons = []
            for poly_match in poly_matches:
                poly_bins = [int(m.group(1)) for m in _LOC.finditer(poly_match.group(1))]
                if with_box_at_start and not bbox:
                    if len(poly_bins) > 4:
                        bbox, poly_bins = poly_bins[:4], poly_bins[4:]
                    else:
                        bbox = [0, 0, 0, 0]
                if len(poly_bins) % 2 == 1:
                    poly_bins = poly_bins[:-1]
                polygons.append(dequantize(poly_bins, image_size))
            instance: dict[str, Any] = {"cat_name": phrase, "polygons": polygons}
            # reference: the [0, 0, 0, 0] placeholder is a non-empty list, so it is dequantized too.
            if bbox:
                instance["bbox"] = dequantize(bbox, image_size)
            instances.append(instance)
    return instances


# The answer of each post-processing type, from the generated text and the type's config entry.
# reference: the per-type config is only read for "ocr", and only with upper-case keys ("PATTERN",
# "AREA_THRESHOLD"); the released checkpoints write them lower-case, so the defaults always apply.
def _pure_text(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> str:
    # reference: "<pad>" survives in pure text, unlike in every other type.
    return text.replace("<s>", "").replace("</s>", "").strip()


def _ocr(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    instances = _parse_ocr(
        text, image_size, pattern=entry.get("PATTERN"), area_threshold=entry.get("AREA_THRESHOLD", 0.0)
    )
    return {"quad_boxes": [i["quad_box"] for i in instances], "labels": [i["text"] for i in instances]}


def _bboxes_answer(instances: list[dict]) -> dict:
    # reference: would add "scores" when instances carry a "score"; none of its parsers produce one.
    return {"bboxes": [i["bbox"] for i in instances], "labels": [i["cat_name"] for i in instances]}


def _description_with_bboxes(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    return _bboxes_answer(_parse_bboxes(text, image_size))


def _bboxes(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    return _bboxes_answer(_parse_bboxes(text, image_size, allow_empty_phrase=True))


def _phrase_grounding(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    instances = _parse_phrase_grounding(text, image_size, banned)
    return {
        "bboxes": [bbox for i in instances for bbox in i["bbox"]],
        "labels": [i["cat_name"] for i in instances for _ in i["bbox"]],
    }


def _polygons_answer(instances: list[dict]) -> dict:
    return {"polygons": [i["polygons"] for i in instances], "labels": [i["cat_name"] for i in instances]}


def _description_with_polygons(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    return _polygons_answer(_parse_polygons(text, image_size))


def _polygons(text: str, image_size, entry: Mapping, banned: frozenset[str]) -> dict:
    return _polygons_answer(_parse_polygons(text, image_size, allow_empty_phrase=True))


def _description_with_bboxes_or_polygons(
    text: str, image_size, entry: Mapping, banned: frozenset[str]
) -> dict:
    # reference: the choice is made on the raw text, before "<s>" etc. are removed.
    if "<poly>" in text:
        instances = _parse_polygons(text, image_size)
    else:
        instances = _parse_bboxes(text, image_size)
    with_polygons = [i for i in instances if "polygons" in i]
    with_bboxes = [i for i in instances if "polygons" not in i]
    return {
        "bboxes": [i["bbox"] for i in with_bboxes],
        "bboxes_labels": [i["cat_name"] for i in with_bboxes],
        "polygons": [i["polygons"] for i in with_polygons],
        "polygons_labels": [i["cat_name"] for i in with_polygons],
    }


POST_PROCESSING_TYPES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "pure_text": _pure_text,
        "ocr": _ocr,
        "description_with_bboxes": _description_with_bboxes,
        "bboxes": _bboxes,
        "phrase_grounding": _phrase_grounding,
        "description_with_polygons": _description_with_polygons,
        "polygons": _polygons,
        "description_with_bboxes_or_polygons": _description_with_bboxes_or_polygons,
    }
)
_NEEDS_NO_SIZE = {"pure_text"}


def _check_image_size(image_size: object) -> None:
    ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2
    if not ok or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in image_size):
        raise InputError(f"image_size must be (width, height) of the original image, got {image_size!r}")


def post_process(
    text: str,
    task: str,
    image_size: tuple[float, float] | None,
    config: Mapping[str, Any] | None,
    table: TaskTable = DEFAULT_TABLE,
) -> dict[str, Any]:
    """`{task: answer}` from generated text decoded with its special tokens kept.

    `config` is the checkpoint's `post_processor_config`; `image_size` is (width, height) of the
    original image, in pixels. A task missing from `table` is treated as pure text, like the reference.
    """
    kind = table.post_processing_type(task)
    answer = POST_PROCESSING_TYPES.get(kind)
    if answer is None:
        raise ModelFolderError(
            f"task {task} has unknown post-processing type {kind!r}, "
            f"expected one of: {', '.join(POST_PROCESSING_TYPES)}"
        )
    config = config or {}
    # reference: a type without an entry in post_processor_config cannot be parsed at all.
    if kind not in config:
        raise ModelFolderError(
            f"post_processor_config has no entry for {kind!r} (needed by task {task}); "
            f"it has: {', '.join(config) or 'nothing'}"
        )
    if kind not in _NEEDS_NO_SIZE:
        _check_image_size(image_size)
    entry = config[kind] or {}
    banned = frozenset(config.get("phrase_grounding", {}).get("banned_grounding_tokens", []))
    return {task: answer(text, image_size, entry, banned)}


def decode_generated(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Generated ids to text with special tokens kept, as the model card's `processor.batch_decode`.

    That is `batch_decode(generated_ids, skip_special_tokens=False)[0]`, which transformers 5 runs
    through the `tokenizers` backend, skipping `clean_up_tokenization_spaces` for BPE vocabularies.
    """
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def decode_sequence(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Generated ids to text as `post_process_generation(sequence=ids)` decodes them.

    reference (`decode_with_spans`): a leading `<s>` is dropped, special tokens are written literally
    and every other token is decoded on its own, so a character split across tokens becomes U+FFFD
    where `decode_generated` would join it.
    """
    ids = [int(i) for i in ids]
    if ids and ids[0] == tokenizer.token_to_id(BOS_TOKEN):
        ids = ids[1:]
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    decoder = tokenizer.decoder
    pieces = []
    for i in ids:
        token = tokenizer.id_to_token(i)
        if token is None:
            raise InputError(f"token id {i} is not in the vocabulary of {tokenizer.get_vocab_size()} tokens")
        if token in specials:
            pieces.append(token)
        else:
            pieces.append(decoder.decode([token]) if decoder is not None else token)
    return "".join(pieces)


def post_process_sequence(
    ids: Sequence[int],
    task: str,
    image_size: tuple[float, float] | None,
    config: Mapping[str, Any] | None,
    tokenizer: Tokenizer,
    table: TaskTable = DEFAULT_TABLE,
) -> dict[str, Any]:
    """`post_process` of generated ids, as `post_process_generation(sequence=ids, ...)`."""
    return post_process(decode_sequence(tokenizer, ids), task, image_size, config, table)
