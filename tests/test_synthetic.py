"""Synthetic scenes (generator, reference targets) and the shipped model trained on them, scored
through the runtime: task accuracy, image dependence, and each quantized variant against fp32."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flonnx.runtime import synthetic
from flonnx.runtime.evaluate import box_iou, evaluate, failures, polygon_mask, requests_for, runtime_answerer
from flonnx.runtime.postprocess import post_process
from flonnx.runtime.prompts import build_prompt

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"
IMAGE_SIZE = 160
SUBSET = 40  # held-out scenes scored in `make test`
POST_PROCESSOR_CONFIG = {
    "ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the", "a", "an"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "polygons": {},
}
# The subset's floor: the requirements, and the control of a model that ignores the image.
REQUIRED = {"caption_exact": 0.70, "od_precision": 0.70, "od_recall": 0.70, "od_mean_iou": 0.60}
CONTROL_CEILING = {"shuffled_caption_exact": 0.10, "shuffled_od_recall": 0.25}
# The 2 points are measured on 300 scenes (tools/synthetic_report.py); on this subset one
# changed caption is 2.5 points, so the regression test allows two changed answers.
INT8_TOLERANCE = 2 / SUBSET


# -- the generator ---------------------------------------------------------------------------------


def test_scene_depends_only_on_seed_and_index():
    a, b = synthetic.make_scene(3, 17), synthetic.make_scene(3, 17)
    assert a.objects == b.objects and a.word == b.word
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    others = [synthetic.make_scene(3, 18), synthetic.make_scene(4, 17)]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(o.image)) for o in others)


@pytest.mark.parametrize("index", range(40))
def test_scene_content(index):
    scene = synthetic.make_scene(0, index)
    width, height = scene.size
    assert width in synthetic.SIZES and height in synthetic.SIZES
    assert 1 <= len(scene.objects) <= 3
    assert len({(o.shape, o.color) for o in scene.objects}) == len(scene.objects)
    assert [o.box[0] for o in scene.objects] == sorted(o.box[0] for o in scene.objects)
    things = [o.box for o in scene.objects] + ([scene.word.box] if scene.word else [])
    for i, a in enumerate(things):
        x1, y1, x2, y2 = a
        assert 0 < x1 < x2 < width and 0 < y1 < y2 < height
        assert all(box_iou(a, b) == 0 for b in things[i + 1 :])
    pixels = np.asarray(scene.image).astype(int)
    for obj in scene.objects:  # the shape is drawn in its colour, inside its box
        mask = synthetic.scene_mask(obj, scene.size)
        assert mask.sum() > 0.3 * (obj.box[2] - obj.box[0]) * (obj.box[3] - obj.box[1])
        assert np.abs(pixels[mask].mean(axis=0) - synthetic.COLORS[obj.color]).max() < 20


def test_caption_wording():
    objects = [
        synthetic.SceneObject("circle", "red", (10, 10, 50, 50)),
        synthetic.SceneObject("square", "orange", (60, 10, 90, 40)),
        synthetic.SceneObject("triangle", "blue", (100, 10, 140, 50)),
    ]
    scene = synthetic.Scene(synthetic.make_scene(0, 0).image, tuple(objects), None)
    assert synthetic.caption(scene) == "a red circle, an orange square and a blue triangle"
    two = synthetic.Scene(scene.image, tuple(objects[:2]), None)
    assert synthetic.caption(two) == "a red circle and an orange square"


@pytest.mark.parametrize("index", range(30))
def test_targets_parse_back_to_the_truth(index):
    """Each reference target, post-processed by the runtime, gives the scene's truth within a pixel."""
    scene = synthetic.make_scene(1, index)
    size = scene.size
    tolerance = max(size) / 1000 + 1
    tasks = set()
    for example in synthetic.examples(scene):
        tasks.add(example.task)
        build_prompt(example.task, example.text, example.region, size)  # the runtime accepts the request
        answer = post_process(f"</s><s>{example.target}</s>", example.task, size, POST_PROCESSOR_CONFIG)[
            example.task
        ]
        if example.task == "<CAPTION>":
            assert answer == synthetic.caption(scene)
        elif example.task == "<OD>":
            assert answer["labels"] == [o.shape for o in scene.objects]
            np.testing.assert_allclose(answer["bboxes"], [o.box for o in scene.objects], atol=tolerance)
        elif example.task == "<OCR>":
            assert answer == scene.word.text
        elif example.task == "<OCR_WITH_REGION>":
            assert answer["labels"] == [scene.word.text]
            np.testing.assert_allclose(answer["quad_boxes"], [scene.word.quad], atol=tolerance)
        elif example.task == "<CAPTION_TO_PHRASE_GROUNDING>":
            assert len(answer["labels"]) == len(scene.objects)
            np.testing.assert_allclose(answer["bboxes"], [o.box for o in scene.objects], atol=tolerance)
        elif example.task == "<REFERRING_EXPRESSION_SEGMENTATION>":
            obj = next(o for o in scene.objects if example.text == f"the {o.name}")
            mask = polygon_mask(answer["polygons"][0], size)
            truth = synthetic.scene_mask(obj, size)
            assert (mask & truth).sum() / (mask | truth).sum() > 0.8
        elif example.task == "<REGION_TO_CATEGORY>":
            assert answer in {o.name for o in scene.objects}
    assert {"<CAPTION>", "<OD>", "<REFERRING_EXPRESSION_SEGMENTATION>"} <= tasks


def test_boxes_sit_on_the_location_grid():
    for index in range(20):
        scene = synthetic.make_scene(2, index)
        od = next(e for e in synthetic.examples(scene) if e.task == "<OD>")
        bins = [
            int(b) for b in od.target.replace(">", "<").split("<") if b.startswith("loc_") for b in [b[4:]]
        ]
        assert bins and all(b % 50 == 0 for b in bins)


def test_score_of_perfect_and_shuffled_answers():
    scenes = [synthetic.make_scene(5, i) for i in range(12)]
    truth = []
    for scene in scenes:
        answers = []
        for example in requests_for(scene):
            text = f"</s><s>{example.target}</s>"
            answers.append(post_process(text, example.task, scene.size, POST_PROCESSOR_CONFIG)[example.task])
        truth.append(answers)
    metrics = evaluate(lambda pairs: [a for s in truth for a in s][: len(pairs)], 12, seed=5, chunk=12)[0]
    for name in ("caption_exact", "od_precision", "od_recall", "ocr_word", "ocr_region", "grounding_recall"):
        assert metrics[name] == 1.0, name
    assert metrics["od_mean_iou"] > 0.97 and metrics["segmentation_iou"] > 0.85
    assert metrics["region_category"] == 1.0
    assert metrics["shuffled_caption_exact"] < 0.2 and metrics["shuffled_od_recall"] < 0.3
    assert failures(metrics) == []


# -- the shipped model through the runtime ---------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"no trained model in {SHIPPED}")
    from flonnx.export.exporter import Progress, export

    out = tmp_path_factory.mktemp("synthetic_export") / "export"
    export(str(SHIPPED), out, image_size=IMAGE_SIZE, progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="module")
def fp32_metrics(shipped_export: Path) -> dict:
    from flonnx.runtime.model import Florence2

    model = Florence2.load(shipped_export, threads=1)
    return evaluate(runtime_answerer(model), SUBSET)[0]


def test_shipped_model_is_small():
    if not SHIPPED.is_dir():
        pytest.skip(f"no trained model in {SHIPPED}")
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 15_000_000


def test_shipped_model_meets_the_requirements(fp32_metrics):
    for name, floor in REQUIRED.items():
        assert fp32_metrics[name] >= floor, (name, fp32_metrics)


def test_shipped_model_uses_the_image(fp32_metrics):
    for name, ceiling in CONTROL_CEILING.items():
        assert fp32_metrics[name] <= ceiling, (name, fp32_metrics)


def test_eval_command_prints_the_table(shipped_export: Path, tmp_path: Path):
    out = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "flonnx.runtime.cli", "eval", str(shipped_export), "--synthetic", "4"]
    result = subprocess.run([*command, "--json", str(out), "--threads", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "<CAPTION> exact match" in result.stdout and "fp32" in result.stdout
    assert set(json.loads(out.read_text())["fp32"]) >= set(REQUIRED)


def _quantize_available() -> bool:
    try:
        return importlib.util.find_spec("flonnx.quantize.cli") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(
    not _quantize_available(), reason="the quantize stage (flonnx.quantize.cli) is not there yet"
)
def test_int8_stays_within_two_points_of_fp32(shipped_export: Path, fp32_metrics: dict, tmp_path: Path):
    """The quantization regression test: int8 on the held-out subset, metric by metric."""
    import shutil

    from flonnx.runtime.model import Florence2

    folder = tmp_path / "export"
    shutil.copytree(shipped_export, folder)
    images = []
    for i in range(4):  # the quantize report compares variants on scenes like the model's
        images.append(tmp_path / f"scene{i}.png")
        synthetic.make_scene(777, i).image.save(images[-1])
    command = [sys.executable, "-m", "flonnx.runtime.cli", "quantize", str(folder), "--recipe", "int8"]
    result = subprocess.run([*command, "--images", *map(str, images)], capture_output=True, text=True)
    # 1: the variant is written but its own report flagged it; the task metrics below decide here.
    assert result.returncode in (0, 1), result.stderr
    variants = json.loads((folder / "flonnx.json").read_text())["variants"]
    name = next(v for v in variants if v != "fp32" and "8" in v)
    metrics = evaluate(runtime_answerer(Florence2.load(folder, variant=name, threads=1)), SUBSET)[0]
    for key, value in fp32_metrics.items():
        if math.isnan(value) or key.startswith("shuffled"):
            continue
        assert metrics[key] >= value - INT8_TOLERANCE, (key, value, metrics[key])
