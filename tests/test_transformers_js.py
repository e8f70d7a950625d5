"""transformers.js reads flonnx's folders: its Florence-2 example (js/florence2.mjs, with the
@huggingface/transformers pinned in js/package-lock.json) on the shipped synthetic model's export
and on its int8 (transformers.js `q8`) and int4 (`q4`) variants answers as flonnx's runtime does.

- Given the same pixels, the answers are the same, token for token, on every task and variant.
- Given an image that needs resizing, the pixels differ: transformers.js in Node resizes with
  sharp's affine transform (bicubic, not antialiased) where transformers and flonnx use PIL's
  bicubic resize (antialiased when downscaling), and a few answers change (OCR most). Images at
  the model's input size pass both unchanged.
- Coordinates and polygons are compared as tests/jsanswers.py says.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from jsanswers import difference
from PIL import Image

from flonnx.runtime import synthetic

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js"
NODE = shutil.which("node")
IMAGE_SIZE = 160
SEED = 12345  # held-out scenes, as in tools/synthetic_report.py
SCENES = 6  # as generated (200-280 px a side): resized by both sides
INPUT_SIZED = 2  # scenes with a word, resized to 160x160 beforehand: both sides see the same pixels
MAX_NEW_TOKENS = 64
DTYPES = {"fp32": "fp32", "int8": "q8", "int4": "q4"}  # flonnx variant: transformers.js dtype
TASKS = (
    "<CAPTION>",
    "<OD>",
    "<OCR>",
    "<OCR_WITH_REGION>",
    "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REGION_TO_CATEGORY>",
    "<REFERRING_EXPRESSION_SEGMENTATION>",  # polygons: transformers.js cannot parse them
)
REGION_TASKS = {"<REGION_TO_CATEGORY>"}
# Answers equal on resized images, at least (measured: 32 of these 36 in each variant).
RESIZED_AGREEMENT = 0.8


@pytest.fixture(scope="module")
def folder(synthetic_variants_160: Path) -> Path:
    """The shipped model exported at 160 px, with flonnx's int8 and int4 variants beside fp32."""
    if NODE is None:
        pytest.skip("node is not installed: transformers.js cannot run")
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"transformers.js is not installed in {JS / 'node_modules'}: run `make setup`")
    return synthetic_variants_160


@pytest.fixture(scope="module")
def requests(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each task on each scene that has an answer for it (OCR needs a word), images as PNG files."""
    images = tmp_path_factory.mktemp("scenes")
    found = []
    worded = [i for i in range(SCENES, SCENES + 20) if synthetic.make_scene(SEED, i).word][:INPUT_SIZED]
    for index in [*range(SCENES), *worded]:
        scene = synthetic.make_scene(SEED, index)
        image = scene.image
        if index >= SCENES:
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        path = images / f"scene-{index}.png"
        image.save(path)
        same_pixels = image.size == (IMAGE_SIZE, IMAGE_SIZE)
        firsts = {}
        for example in synthetic.examples(scene):  # the text and region of the first object
            firsts.setdefault(example.task, example)
        for task in TASKS:
            if task in firsts:
                text = firsts[task].text or firsts[task].region or ""
                found.append(dict(image=path, task=task, text=text, size=image.size, same_pixels=same_pixels))
    return found


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where transformers.js leaves the pixel_values it computed, one file per image."""
    return tmp_path_factory.mktemp("pixel_values")


@pytest.fixture(scope="module")
def theirs(folder: Path, requests: list[dict], pixels: Path) -> dict[str, list[dict]]:
    """transformers.js's results per flonnx variant, all from one Node process."""
    jobs = [
        {
            "folder": str(folder),
            "dtype": dtype,
            "max_new_tokens": MAX_NEW_TOKENS,
            "num_beams": 1,
            "threads": 1,
            "save_pixel_values": str(pixels),
            "requests": [{"image": str(r["image"]), "task": r["task"], "text": r["text"]} for r in requests],
        }
        for dtype in DTYPES.values()
    ]
    command = [NODE, str(JS / "florence2.mjs")]
    done = subprocess.run(command, input=json.dumps(jobs), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout.strip().splitlines()[-1])
    assert [job["dtype"] for job in output] == list(DTYPES.values())
    return {variant: job["results"] for variant, job in zip(DTYPES, output)}


def _request(request: dict, image):
    from flonnx.runtime.model import Request

    if request["task"] in REGION_TASKS:
        return Request(image, request["task"], region=request["text"])
    return Request(image, request["task"], request["text"] or None)


def _run(model, request):
    return model.run_batch([request], max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0]


def test_export_names_the_processor_class(folder: Path):
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Florence2Processor"
    assert "<OD>" in preprocessor["task_prompts_without_inputs"]
    assert "<CAPTION_TO_PHRASE_GROUNDING>" in preprocessor["task_prompts_with_input"]
    assert preprocessor["tasks_answer_post_processing_type"]["<OD>"] == "description_with_bboxes"


def test_requests_cover_every_task(requests: list[dict]):
    for same_pixels in (False, True):
        assert {r["task"] for r in requests if r["same_pixels"] == same_pixels} == set(TASKS)


@pytest.mark.parametrize("variant", DTYPES)
def test_same_pixels_same_answers(folder: Path, requests: list, theirs: dict, pixels: Path, variant: str):
    """flonnx fed transformers.js's own pixel_values answers as transformers.js, every request."""
    import onnxruntime

    from flonnx.runtime.manifest import read_manifest
    from flonnx.runtime.model import Florence2, ImageFeatures

    model = Florence2.load(folder, variant=variant, threads=1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    graph = read_manifest(folder)["variants"][variant]["vision_encoder"]["file"]
    vision = onnxruntime.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])
    different = []
    for request, their in zip(requests, theirs[variant], strict=True):
        pixel_values = np.fromfile(pixels / f"{request['image'].name}.f32", np.float32)
        pixel_values = pixel_values.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        features = ImageFeatures(vision.run(None, {"pixel_values": pixel_values})[0][0], request["size"])
        different.append(difference(request, their, _run(model, _request(request, features))))
    different = [d for d in different if d]
    assert not different, f"{len(different)}/{len(requests)} answers differ:\n" + "\n".join(different)


@pytest.mark.parametrize("variant", DTYPES)
def test_answers_like_flonnx(folder: Path, requests: list[dict], theirs: dict, variant: str):
    """Each side from the image file: equal where no resize is needed, mostly equal elsewhere."""
    from flonnx.runtime.model import Florence2

    model = Florence2.load(folder, variant=variant, threads=1)
    found = {True: [], False: []}
    for request, their in zip(requests, theirs[variant], strict=True):
        our = _run(model, _request(request, request["image"]))
        found[request["same_pixels"]].append(difference(request, their, our))
    different = [d for d in found[True] if d]
    assert not different, "answers differ on images of the input size:\n" + "\n".join(different)
    resized = found[False]
    equal = sum(d is None for d in resized)
    assert equal >= RESIZED_AGREEMENT * len(resized), "\n".join(d for d in resized if d)
