"""Prompts: task tables, prompt strings, region quantization and token ids against transformers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flonnx.runtime.errors import FlonnxError, ModelFolderError, PromptError
from flonnx.runtime.prompts import (
    DEFAULT_POST_PROCESSING_TYPES,
    DEFAULT_PROMPTS_WITH_INPUT,
    DEFAULT_PROMPTS_WITHOUT_INPUT,
    DEFAULT_REGION_TASKS,
    DEFAULT_TABLE,
    TaskTable,
    build_prompt,
    check_length,
    prompt_ids,
    quantize,
    region_tokens,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

WITHOUT_INPUT = list(DEFAULT_PROMPTS_WITHOUT_INPUT)
TEXT_TASKS = [t for t in DEFAULT_PROMPTS_WITH_INPUT if t not in DEFAULT_REGION_TASKS]
REGION_TASKS = [t for t in DEFAULT_PROMPTS_WITH_INPUT if t in DEFAULT_REGION_TASKS]
EXAMPLE_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "A green car parked in front of a yellow building.",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "the car",
    "<OPEN_VOCABULARY_DETECTION>": "a green car",
    **dict.fromkeys(REGION_TASKS, "<loc_52><loc_332><loc_932><loc_774>"),
}


def reference_prompt(reference, task, text=None):
    return reference._construct_prompts(task + (text or ""))[0]


# --- tables ------------------------------------------------------------------------------------------------


def test_default_tables_equal_the_reference(reference):
    for ours, theirs in [
        (DEFAULT_PROMPTS_WITHOUT_INPUT, reference.task_prompts_without_inputs),
        (DEFAULT_PROMPTS_WITH_INPUT, reference.task_prompts_with_input),
        (DEFAULT_POST_PROCESSING_TYPES, reference.tasks_answer_post_processing_type),
    ]:
        assert list(ours.items()) == list(theirs.items())  # order too: the reference scans in order


def test_table_from_config_falls_back_to_defaults():
    assert TaskTable.from_config({}) == DEFAULT_TABLE
    assert TaskTable.from_config({"image_seq_length": 577}) == DEFAULT_TABLE
    custom = TaskTable.from_config({"task_prompts_with_input": {"<VQA>": "Answer: {input}"}})
    assert custom.prompts_without_input == DEFAULT_PROMPTS_WITHOUT_INPUT
    assert custom.post_processing_types == DEFAULT_POST_PROCESSING_TYPES
    assert custom.tasks == (*DEFAULT_PROMPTS_WITHOUT_INPUT, "<VQA>")
    assert custom.region_tasks == frozenset()
    assert build_prompt("<VQA>", "what colour?", table=custom) == "Answer: what colour?"


def test_table_round_trips_through_config():
    config = DEFAULT_TABLE.to_config()
    assert set(config) == {
        "task_prompts_without_inputs",
        "task_prompts_with_input",
        "tasks_answer_post_processing_type",
    }
    assert TaskTable.from_config(config) == DEFAULT_TABLE


def test_table_is_hashable():
    assert hash(TaskTable()) == hash(DEFAULT_TABLE)


def test_table_is_immutable():
    with pytest.raises(TypeError):
        DEFAULT_TABLE.prompts_without_input["<OD>"] = "x"
    with pytest.raises(AttributeError):
        DEFAULT_TABLE.region_tasks = frozenset()


@pytest.mark.parametrize(
    "config",
    [
        {"task_prompts_with_input": ["<OD>"]},
        {"task_prompts_without_inputs": {"<OD>": 3}},
        {"task_prompts_with_input": {"<X>": "Locate {thing}"}},
        {"task_prompts_with_input": {"<X>": "Locate it"}},
    ],
)
def test_bad_table_config_raises(config):
    with pytest.raises(ModelFolderError):
        TaskTable.from_config(config)


def test_post_processing_type_of_unknown_task_is_pure_text():
    assert DEFAULT_TABLE.post_processing_type("<OD>") == "description_with_bboxes"
    assert DEFAULT_TABLE.post_processing_type("<DocVQA>") == "pure_text"


# --- prompts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", DEFAULT_TABLE.tasks)
def test_every_task_prompt_equals_reference(task, reference):
    text = EXAMPLE_INPUT.get(task)
    assert build_prompt(task, text) == reference_prompt(reference, task, text)


def test_prompt_examples():
    assert build_prompt("<OD>") == "Locate the objects with category name in the image."
    assert build_prompt("<CAPTION>", "") == "What does the image describe?"
    assert build_prompt("<OPEN_VOCABULARY_DETECTION>", "  a car \n") == "Locate a car in the image."
    assert (
        build_prompt("<REGION_TO_OCR>", region=" <loc_1><loc_2><loc_3><loc_999> ")
        == "What text is in the region <loc_1><loc_2><loc_3><loc_999>?"
    )


PIECES = list("abcXYZ019 .,'?-\t\n{}<>_") + [
    "é",
    "日",
    "😀",
    "\u00a0",
    "<loc_5>",
    "<s>",
    "<pad>",
    " <mask>",
    "<OD",
]
TEXT = (
    st.lists(st.sampled_from(PIECES), max_size=30)
    .map("".join)
    .filter(lambda t: t.strip() and not any(task in t for task in DEFAULT_TABLE.tasks))
)


@FAST
@given(task=st.sampled_from(TEXT_TASKS), text=TEXT)
def test_text_prompts_equal_reference(task, text, reference):
    assert build_prompt(task, text) == reference_prompt(reference, task, text)


LOC = st.integers(0, 999).map(lambda b: f"<loc_{b}>")
REGION = st.builds(
    lambda a, b, c, d, pad: pad + a + b + c + d + pad, LOC, LOC, LOC, LOC, st.sampled_from(["", " "])
)


@FAST
@given(task=st.sampled_from(REGION_TASKS), region=REGION, as_text=st.booleans())
def test_region_prompts_equal_reference(task, region, as_text, reference):
    ours = build_prompt(task, region) if as_text else build_prompt(task, region=region)
    assert ours == reference_prompt(reference, task, region)


SIZES = st.one_of(
    st.sampled_from([(1, 1), (3, 7), (4000, 3000), (768, 768), (641, 479)]),
    st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
)


@st.composite
def boxes_in_image(draw):
    width, height = draw(SIZES)

    def coord(limit):
        # exact bin edges and the image border are where float32 vs float64 would differ
        edge = st.integers(0, 1000).map(lambda b: b * limit / 1000)
        return draw(st.one_of(st.floats(0, limit), edge, st.integers(0, int(limit))))

    x1, x2 = sorted([coord(width), coord(width)])
    y1, y2 = sorted([coord(height), coord(height)])
    return [x1, y1, x2, y2], (width, height)


@FAST
@given(box_size=boxes_in_image())
def test_pixel_box_quantization_equals_reference(box_size, reference):
    import torch

    box, size = box_size
    expected = reference.post_processor.quantize(torch.tensor([box]), size)[0].tolist()
    assert quantize(box, size) == expected
    assert build_prompt("<REGION_TO_CATEGORY>", region=box, image_size=size) == reference_prompt(
        reference, "<REGION_TO_CATEGORY>", "".join(f"<loc_{b}>" for b in expected)
    )


def test_pixel_box_examples():
    assert region_tokens([0, 0, 640, 480], (640, 480)) == "<loc_0><loc_0><loc_999><loc_999>"
    assert region_tokens((64.0, 48, 320, 240.5), (640, 480)) == "<loc_100><loc_100><loc_500><loc_501>"
    np = pytest.importorskip("numpy")
    assert region_tokens(np.array([1, 1, 2, 2]), (3, 7)) == "<loc_333><loc_142><loc_666><loc_285>"


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_task_lists_valid_ones():
    with pytest.raises(PromptError, match=r"'<DocVQA>'.*<OCR>.*<REGION_TO_OCR>"):
        build_prompt("<DocVQA>", "what?")
    with pytest.raises(PromptError, match="'od'"):
        build_prompt("od")


@pytest.mark.parametrize("text", [" ", "a car", "<loc_1><loc_2><loc_3><loc_4>"])
def test_input_for_a_task_without_input_raises(text, reference):
    with pytest.raises(PromptError, match=r"<OD> takes no input.*" + repr(text)[:3]):
        build_prompt("<OD>", text)
    with pytest.raises(ValueError):  # the reference refuses these too
        reference_prompt(reference, "<OD>", text)


def test_region_for_a_task_without_input_raises():
    with pytest.raises(PromptError, match="takes no input"):
        build_prompt("<CAPTION>", region=[1, 2, 3, 4], image_size=(10, 10))


@pytest.mark.parametrize("task", TEXT_TASKS)
@pytest.mark.parametrize("text", [None, "", "  \n"])
def test_missing_text_raises(task, text):
    with pytest.raises(PromptError, match=f"{task} needs text"):
        build_prompt(task, text)


@pytest.mark.parametrize("task", REGION_TASKS)
def test_missing_region_raises(task):
    with pytest.raises(PromptError, match=f"{task} needs a region"):
        build_prompt(task)


def test_region_for_a_text_task_raises():
    with pytest.raises(PromptError, match=r"takes text, not a region.*<REGION_TO_SEGMENTATION>"):
        build_prompt("<OPEN_VOCABULARY_DETECTION>", region=[1, 2, 3, 4], image_size=(10, 10))


@pytest.mark.parametrize(
    "region",
    [
        "the car",
        "<loc_1><loc_2><loc_3>",
        "<loc_1><loc_2><loc_3><loc_4><loc_5>",
        "<loc_1> <loc_2><loc_3><loc_4>",
        "<loc_1><loc_2><loc_3><loc_1000>",
        "<loc_01><loc_2><loc_3><loc_4>",
    ],
)
def test_bad_region_string_raises(region):
    with pytest.raises(PromptError, match="four location tokens"):
        build_prompt("<REGION_TO_DESCRIPTION>", region)


@pytest.mark.parametrize(
    ("box", "match"),
    [
        ([10, 10, 700, 20], r"\[10, 10, 700, 20\].*\(640, 480\)"),
        ([-1, 0, 5, 5], r"not inside the image of size \(640, 480\)"),
        ([0, 0, 5, 481], "not inside"),
        ([5, 0, 4, 5], "not inside"),
        ([1, 2, 3], "four numbers"),
        ([1, 2, 3, float("nan")], "four numbers"),
        ([1, 2, 3, "4"], "four numbers"),
        (7, "four numbers"),
    ],
)
def test_bad_pixel_box_raises(box, match):
    with pytest.raises(PromptError, match=match):
        build_prompt("<REGION_TO_SEGMENTATION>", region=box, image_size=(640, 480))


def test_pixel_box_needs_a_valid_image_size():
    with pytest.raises(PromptError, match="needs image_size"):
        build_prompt("<REGION_TO_CATEGORY>", region=[1, 2, 3, 4])
    with pytest.raises(PromptError, match="image_size must be"):
        build_prompt("<REGION_TO_CATEGORY>", region=[1, 2, 3, 4], image_size=(0, 10))


def test_text_and_region_together_raise():
    with pytest.raises(PromptError, match="both"):
        build_prompt(
            "<REGION_TO_CATEGORY>", "<loc_1><loc_2><loc_3><loc_4>", region=[1, 2, 3, 4], image_size=(9, 9)
        )


@pytest.mark.parametrize(
    "text", ["find <OD> here", "a <CAPTION_TO_PHRASE_GROUNDING> b", "<OPEN_VOCABULARY_DETECTION>"]
)
def test_text_with_a_task_token_raises(text):
    with pytest.raises(PromptError, match="must not contain a task token"):
        build_prompt("<OPEN_VOCABULARY_DETECTION>", text)


def test_text_must_be_a_string():
    with pytest.raises(PromptError, match="text must be a string, got list"):
        build_prompt("<OPEN_VOCABULARY_DETECTION>", ["a car"])


def test_errors_are_flonnx_value_errors():
    with pytest.raises(FlonnxError):
        build_prompt("<nope>")
    with pytest.raises(ValueError):
        build_prompt("<nope>")


# --- token ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", DEFAULT_TABLE.tasks)
def test_prompt_ids_equal_processor_input_ids(task, reference, tokenizer):
    from PIL import Image

    text = EXAMPLE_INPUT.get(task)
    input_ids = reference(images=Image.new("RGB", (64, 48)), text=task + (text or ""))["input_ids"][0]
    n_image = reference.num_image_tokens
    assert input_ids[:n_image] == [reference.image_token_id] * n_image
    ids = prompt_ids(tokenizer, build_prompt(task, text))
    assert ids == input_ids[n_image:]
    assert ids[0] == 0 and ids[-1] == 2


@FAST
@given(task=st.sampled_from(TEXT_TASKS), text=TEXT)
def test_prompt_ids_of_any_text_equal_processor_tokenizer(task, text, reference, tokenizer):
    prompt = build_prompt(task, text)
    # the processor's layout, with a few image tokens instead of 577
    text_with_image = reference.image_token * 3 + "<s>" + prompt + "</s>"
    expected = reference.tokenizer(text_with_image, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, prompt) == expected[3:]


def test_check_length():
    check_length(447, 577)
    check_length(0, 1024)
    with pytest.raises(PromptError, match=r"577 image tokens \+ 448 text tokens = 1025.*1024.*at most 447"):
        check_length(448, 577)
    with pytest.raises(PromptError, match="= 12.*10 positions"):
        check_length(2, 10, max_positions=10)
