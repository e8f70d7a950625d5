"""Robustness campaign, prompts and options: every misuse through the API and the CLI is one
FlonnxError (exit 2) that names the bad value and what is valid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from flonnx.runtime import cli
from flonnx.runtime.errors import FlonnxError, InputError
from flonnx.runtime.model import Florence2


@pytest.fixture(scope="module")
def model(tiny_export_dir) -> Florence2:
    return Florence2.load(tiny_export_dir, threads=1)


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
LONG_TEXT = " ".join(["word"] * 1200)  # more tokens than the 1024 encoder positions hold

API_CASES = [
    ({"task": "<NOPE>"}, "unknown task '<NOPE>', expected one of: <OCR>"),
    ({"task": "od"}, "unknown task 'od'"),
    ({"task": "<OD>", "text": "extra"}, "task <OD> takes no input"),
    ({"task": "<OD>", "region": [1, 2, 3, 4]}, "task <OD> takes no input"),
    ({"task": "<CAPTION_TO_PHRASE_GROUNDING>"}, "needs text input"),
    ({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "   "}, "needs text input"),
    ({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": LONG_TEXT}, "1024"),
    ({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a <OD> b"}, "must not contain a task token"),
    ({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": 5}, "text must be a string"),
    ({"task": "<REGION_TO_CATEGORY>"}, "needs a region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": [1, 2, 3]}, "region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": [1, 2, math.nan, 4]}, "region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": [1, 2, math.inf, 4]}, "region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": ["a", 2, 3, 4]}, "region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": "<loc_1><loc_2>"}, "region"),
    ({"task": "<REGION_TO_CATEGORY>", "region": "<loc_1><loc_2><loc_3><loc_1000>"}, "region"),
    ({"task": "<CAPTION>", "max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"task": "<CAPTION>", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"task": "<CAPTION>", "num_beams": 0}, "num_beams"),
    ({"task": "<CAPTION>", "num_beams": 2.5}, "num_beams"),
    ({"task": "<CAPTION>", "do_sample": True, "temperature": 0}, "temperature"),
    ({"task": "<CAPTION>", "do_sample": True, "top_p": 1.5}, "top_p"),
    ({"task": "<CAPTION>", "do_sample": True, "top_k": -1}, "top_k"),
    ({"task": "<CAPTION>", "repetition_penalty": 0}, "repetition_penalty"),
    ({"task": "<CAPTION>", "num_return_sequences": 5, "num_beams": 2}, "num_return_sequences"),
    ({"task": "<CAPTION>", "seed": "x"}, "seed"),
    ({"task": "<CAPTION>", "scores": "yes"}, "scores must be true or false"),
    ({"task": "<CAPTION>", "beam_width": 3}, "beam_width"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_api_misuse_is_one_clear_error(model, kwargs, fragment):
    kwargs = dict(kwargs)
    task = kwargs.pop("task")
    with pytest.raises(FlonnxError) as caught:
        model.run(IMAGE, task, **kwargs)
    assert isinstance(caught.value, InputError)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "region", [[-50, -50, 40, 30], [0, 0, 1e6, 1e6], [70, 50, 10, 5]], ids=["negative", "huge", "inverted"]
)
def test_regions_outside_the_image_or_inverted_are_refused(model, region):
    """transformers' processor clamps any box's bins to 0..999 and asks nothing; a box outside the
    image or with x2 < x1 is almost always a caller's mistake (wrong image, swapped corners), so
    flonnx refuses it, naming the box, the image size and the rule (a deliberate difference)."""
    with pytest.raises(InputError, match=r"is not inside the image of size \(80, 60\).*0 <= x1 <= x2"):
        model.run(IMAGE, "<REGION_TO_CATEGORY>", region=region)


CLI_CASES = [
    (["--task", "<OD>", "--num-beams", "0"], "num_beams"),
    (["--task", "<OD>", "--max-new-tokens", "-3"], "max_new_tokens"),
    (["--task", "<OD>", "--threads", "0"], "threads must be a positive integer"),
    (["--task", "<OD>", "--variant", "int9"], "unknown variant 'int9'"),
    (["--task", "<OD>", "--dtype", "q5"], "unknown dtype 'q5'"),
    (["--task", "<REGION_TO_CATEGORY>", "--region", "1,2,3"], "expected x1,y1,x2,y2"),
    (["--task", "<REGION_TO_CATEGORY>", "--region", "a,b,c,d"], "expected x1,y1,x2,y2"),
    (["--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--text", LONG_TEXT], "1024"),
    (["--task", "<CAPTION>", "--draw", "/no/such/dir/out.png"], "cannot write --draw"),
]


@pytest.mark.parametrize(("args", "fragment"), CLI_CASES, ids=[str(i) for i in range(len(CLI_CASES))])
def test_cli_misuse_is_one_line_exit_2(tiny_export_dir, tmp_path, capsys, args, fragment):
    image = tmp_path / "image.png"
    IMAGE.save(image)
    try:
        code = cli.main(["run", str(tiny_export_dir), str(image), *args])
    except SystemExit as exit_:  # argparse's own errors (type conversions) also exit 2
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and len([line for line in err if "error" in line]) == 1
