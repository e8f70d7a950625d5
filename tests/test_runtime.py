"""The runtime against `transformers` on the same weights: every task, batches, features reuse, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tasks import REGION, TASKS

from flonnx.runtime import cli
from flonnx.runtime.errors import FlonnxError, InputError, ModelFolderError, PromptError
from flonnx.runtime.model import Florence2, Request

MAX_NEW_TOKENS = 40


def _image(seed: int, size=(400, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def generate_reference(tiny_loc_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_loc_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_loc_model_dir)

    def run(image, task, text=None, max_new_tokens=MAX_NEW_TOKENS):
        inputs = processor(text=task + (text or ""), images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
        generated = processor.batch_decode(ids, skip_special_tokens=False)[0]
        answer = processor.post_process_generation(generated, task=task, image_size=image.size)
        return ids[0].tolist(), answer

    return run


@pytest.fixture(scope="module")
def model(tiny_export_dir) -> Florence2:
    return Florence2.load(tiny_export_dir, threads=2)


def _run(model, requests, **options):
    """Greedy, like the reference here; the checkpoint's num_beams=3 is tested in test_beam.py."""
    options.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    options.setdefault("num_beams", 1)
    return model.run_batch(requests, **options)


@pytest.mark.parametrize(("task", "text"), TASKS, ids=[t for t, _ in TASKS])
def test_every_task_matches_transformers(model, generate_reference, task, text):
    image = _image(0)
    expected_ids, expected = generate_reference(image, task, text)
    (result,) = _run(model, [Request(image, task, text)])
    assert result.tokens == expected_ids
    assert result.as_dict() == expected


def test_random_model_exercises_the_parsers(model):
    """Guard for the test above: with scaled loc rows, box tasks really produce boxes."""
    (od,) = _run(model, [Request(_image(0), "<OD>")])
    (seg,) = _run(model, [Request(_image(0), "<REFERRING_EXPRESSION_SEGMENTATION>", "the red car")])
    assert od.answer["bboxes"] and seg.answer["polygons"]


def test_batch_of_mixed_images_and_prompts_equals_each_alone(model, generate_reference):
    images = [_image(1), _image(2, (640, 480)), _image(3, (33, 17))]
    requests = [
        Request(images[0], "<OD>"),
        Request(images[1], "<CAPTION>"),
        Request(images[2], "<CAPTION_TO_PHRASE_GROUNDING>", "a small dog"),
    ]
    batch = _run(model, requests)
    for request, result in zip(requests, batch):
        (alone,) = _run(model, [request])
        assert result.tokens == alone.tokens
        assert result.as_dict() == alone.as_dict()
        expected_ids, expected = generate_reference(request.image, request.task, request.text)
        assert result.tokens == expected_ids and result.as_dict() == expected


def test_finished_rows_leave_the_batch(model):
    requests = [Request(_image(1), "<OD>"), Request(_image(2), "<CAPTION>")]
    short, long = (
        _run(model, requests[:1], max_new_tokens=3)[0],
        _run(model, requests[1:], max_new_tokens=12)[0],
    )
    assert len(short.tokens) == 4 and short.tokens[-1] == 2  # start + 2 + forced EOS
    assert len(long.tokens) == 13


def test_encoded_image_is_reused_across_tasks(model):
    image = _image(4)
    features = model.encode_image(image)
    assert features.features.shape == (model.num_image_tokens, model.manifest["model"]["d_model"])
    assert features.image_size == image.size
    for task, text in (("<OD>", None), ("<REGION_TO_CATEGORY>", REGION)):
        (direct,) = _run(model, [Request(image, task, text)])
        (reused,) = _run(model, [Request(features, task, text)])
        assert direct.tokens == reused.tokens and direct.answer == reused.answer


def test_same_image_object_goes_through_the_vision_encoder_once(model):
    image = _image(5)
    timings: dict = {}
    calls = []
    original = model.encode_images

    def counting(images, timings=None):
        calls.append(len(images))
        return original(images, timings)

    model.__dict__["encode_images"] = counting
    try:
        _run(model, [Request(image, "<OD>"), Request(image, "<CAPTION>")], timings=timings)
    finally:
        del model.__dict__["encode_images"]
    assert calls == [1]
    assert {"preprocess", "vision", "encoder", "decode", "postprocess"} <= set(timings)


def test_pixel_box_region_equals_loc_tokens(model):
    image = _image(6, (1000, 1000))
    (boxed,) = _run(model, [Request(image, "<REGION_TO_CATEGORY>", region=[100, 150, 700, 900])])
    (tokens,) = _run(model, [Request(image, "<REGION_TO_CATEGORY>", REGION)])
    assert boxed.tokens == tokens.tokens


def test_per_call_options_leave_no_state(model):
    image = _image(7)
    first = _run(model, [Request(image, "<CAPTION>")], max_new_tokens=5)[0]
    again = _run(model, [Request(image, "<CAPTION>")], max_new_tokens=MAX_NEW_TOKENS)[0]
    once_more = _run(model, [Request(image, "<CAPTION>")], max_new_tokens=5)[0]
    assert len(first.tokens) == 6 and len(again.tokens) == MAX_NEW_TOKENS + 1
    assert first.tokens == once_more.tokens


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"task": "<XYZ>"}, PromptError, "<OD>"),
        ({"task": "<CAPTION_TO_PHRASE_GROUNDING>"}, PromptError, "needs text"),
        ({"task": "<OD>", "text": "a car"}, PromptError, "takes no input"),
        ({"task": "<REGION_TO_CATEGORY>", "region": [0, 0, 500, 10]}, PromptError, "not inside the image"),
        ({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "word " * 600}, PromptError, "too long"),
        ({"task": "<OD>", "max_new_tokens": 5000}, InputError, "max_new_tokens"),
    ],
)
def test_bad_requests_raise_typed_errors(model, kwargs, error, fragment):
    with pytest.raises(error, match=None) as raised:
        model.run(_image(0), **kwargs)
    assert fragment in str(raised.value)
    assert isinstance(raised.value, FlonnxError)


def test_runtime_imports_no_heavy_package():
    code = (
        "import sys, flonnx.runtime, flonnx.runtime.model, flonnx.runtime.run_cli, flonnx.runtime.cli\n"
        "heavy = {'torch', 'transformers', 'onnx', 'onnxscript', 'optimum'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- loading ------------------------------------------------------------------------------


def test_load_errors_name_what_is_wrong(tiny_export_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        Florence2.load(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match="not a model folder: no flonnx.json .* and no onnx/"):
        Florence2.load(tmp_path)
    with pytest.raises(InputError, match="available: fp32"):
        Florence2.load(tiny_export_dir, variant="int3")
    with pytest.raises(InputError, match="CPUExecutionProvider"):
        Florence2.load(tiny_export_dir, providers=["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match="threads"):
        Florence2.load(tiny_export_dir, threads=0)


def test_load_checks_sizes_and_optionally_hashes(tiny_export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, copy)
    graph = copy / "onnx" / "encoder_model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="does not match the sha256"):
        Florence2.load(copy, verify="sha256")
    with pytest.raises(ModelFolderError, match="encoder_model.onnx does not match the sha256"):
        Florence2.load(copy)  # the default checks hashes too (once per file identity)
    with pytest.raises(ModelFolderError, match="onnxruntime cannot load .*encoder_model.onnx"):
        Florence2.load(copy, verify="size")  # sizes agree, so only onnxruntime notices
    graph.write_bytes(bytes(data[:-10]))
    with pytest.raises(ModelFolderError, match="bytes"):
        Florence2.load(copy)


def test_flipped_weight_bytes_are_caught_by_default(tiny_export_dir, tmp_path):
    """Same size, flipped bytes in the weights: onnxruntime loads it and answers garbage."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, copy)
    weights = copy / "onnx" / "decoder_model_merged.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(
        b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 64]
    )
    weights.write_bytes(bytes(data))
    assert Florence2.load(copy, verify="size").run(_image(1), "<CAPTION>", max_new_tokens=8)  # it runs
    with pytest.raises(ModelFolderError, match="decoder_model_merged.onnx.data does not match the sha256"):
        Florence2.load(copy)


def test_hashes_are_checked_once_per_file_identity(tiny_export_dir, tmp_path, monkeypatch):
    import os

    from flonnx.runtime import manifest as manifest_module

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, copy)
    monkeypatch.setenv("FLONNX_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    Florence2.load(copy)
    first = len(hashed)
    assert first >= 4 + 5  # the graphs, their weights and the configs
    Florence2.load(copy)
    assert len(hashed) == first  # remembered: a stat per file
    graph = copy / "onnx" / "encoder_model.onnx"
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 10**9))
    Florence2.load(copy)
    assert hashed[first:] == [graph]  # the file that changed, and only it


def test_symlinks_out_of_the_folder_are_refused(tiny_export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, copy)
    weights = copy / "onnx" / "encoder_model.onnx.data"
    outside = tmp_path / "elsewhere.data"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    with pytest.raises(ModelFolderError, match="'onnx/encoder_model.onnx.data' leaves the folder"):
        Florence2.load(copy, verify="size")


# -- CLI ----------------------------------------------------------------------------------


def test_cli_run_prints_json_per_image_and_task(tiny_export_dir, tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"image{seed}.png"
        _image(seed).save(path)
        paths.append(str(path))
    drawn = tmp_path / "drawn.png"
    argv = [
        "run",
        str(tiny_export_dir),
        *paths,
        "--task",
        "<OD>",
        "--task",
        "<CAPTION>",
        "--max-new-tokens",
        "12",
        "--draw",
        str(drawn),
        "--verbose",
    ]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["image"], next(k for k in r if k.startswith("<"))) for r in lines] == [
        (p, t) for p in paths for t in ("<OD>", "<CAPTION>")
    ]
    assert all("vision" in r["timings"] and "decode" in r["timings"] for r in lines)
    for path in paths:
        out = drawn.with_name(f"drawn-{Path(path).stem}.png")
        with Image.open(out) as image:
            assert image.size == (400, 300)


def test_cli_run_result_equals_api(tiny_export_dir, model, tmp_path, capsys):
    path = tmp_path / "image.png"
    _image(3).save(path)
    argv = [
        "run",
        str(tiny_export_dir),
        str(path),
        "--task",
        "<OD>",
        "--max-new-tokens",
        "20",
        "--num-beams",
        "1",
    ]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    with Image.open(path) as image:
        expected = _run(model, [Request(image.copy(), "<OD>")], max_new_tokens=20)[0].as_dict()
    assert printed["<OD>"] == expected["<OD>"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["/no/such/image.png", "--task", "<OD>"], "not found"),
        (["{image}", "--task", "<NOPE>"], "unknown task"),
        (["{image}", "--task", "<OD>", "--max-new-tokens", "0"], "max_new_tokens"),
        (["{image}", "--task", "<OD>", "--variant", "int2"], "available"),
        (["{image}", "--task", "<OD>", "--text", "extra"], "--text 'extra' is not used by <OD>: it takes no"),
        (["{image}", "--task", "<OD>", "--region", "1,2,3,4"], "--region is not used by <OD>; tasks that"),
        (
            ["{image}", "--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--region", "1,2,3,4", "--text", "a"],
            "tasks that take a region: <REGION_TO_SEGMENTATION>",
        ),
        (["{image}", "--task", "<CAPTION_TO_PHRASE_GROUNDING>"], "needs text input"),
        (["{image}", "--task", "<REGION_TO_CATEGORY>"], "needs a region"),
    ],
)
def test_cli_run_errors_are_one_line_exit_2(tiny_export_dir, tmp_path, capsys, args, fragment):
    image = tmp_path / "image.png"
    _image(0).save(image)
    argv = ["run", str(tiny_export_dir), *[a.format(image=image) for a in args]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flonnx run: error:") and fragment in err[0]


def test_cli_help_is_quick_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "flonnx.runtime.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "export" in out.stdout and "run" in out.stdout


def test_one_model_shared_by_threads_answers_as_serial(model):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(_image(seed), task, text) for seed in range(4) for task, text in TASKS[::3]]

    def one(job):
        image, task, text = job
        region = text if text and text.startswith("<loc_") else None
        request = Request(image, task, None if region else text, region)
        return _run(model, [request], max_new_tokens=16)[0].as_dict()

    serial = [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, jobs * 2)) == serial * 2


def _rss_mb() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="RSS is read from /proc (Linux)")
def test_memory_stays_flat_over_thousands_of_requests(model):
    """2000 requests (one in 20 with a new image through the vision encoder): RSS after the first 400
    and at the end differ by under 10%."""
    features = [model.encode_image(_image(seed)) for seed in range(4)]
    tasks = [(task, text) for task, text in TASKS if not (text or "").startswith("<loc_")]

    def batch(start: int) -> list[Request]:
        requests = []
        for i in range(start, start + 8):
            task, text = tasks[i % len(tasks)]
            image = _image(i % 7, (64, 48)) if i % 20 == 0 else features[i % len(features)]
            requests.append(Request(image, task, text))
        return requests

    for start in range(0, 400, 8):
        _run(model, batch(start), max_new_tokens=6)
    warm = _rss_mb()
    for start in range(400, 2000, 8):
        _run(model, batch(start), max_new_tokens=6)
    assert _rss_mb() < warm * 1.10, (warm, _rss_mb())
