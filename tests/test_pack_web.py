"""`flonnx pack FOLDER --target web`: a transformers.js model folder and an offline page, run for real
in Debian's chromium (headless, driven by puppeteer-core through js/browser.mjs) over loopback.

The pack's graphs are the source variant's graphs with their weights stored where a browser can hand
them over (one `<graph><suffix>.onnx_data` per graph): flonnx must compute exactly the source's
answers from them, and the page (transformers.js on onnxruntime-web's WebAssembly build) must answer
as flonnx does on images of the model's input size (same pixels; tests/jsanswers.py says how
coordinates compare). Elsewhere the browser's canvas resize differs from PIL's, as sharp's does in
Node (tests/test_transformers_js.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from jsanswers import difference
from PIL import Image
from tasks import TASKS

from flonnx.runtime import synthetic

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js"
NODE = shutil.which("node")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGE_SIZE = 160
SEED = 4242
MAX_NEW_TOKENS = 48
SCENES = 2  # at the model's input size: the browser and flonnx see the same pixels
VARIANTS = {"fp32": "fp32", "int8": "q8", "int4": "q4"}  # flonnx variant: transformers.js dtype
BROWSER_TASKS = (
    ("<CAPTION>", None),
    ("<OD>", None),
    ("<OCR_WITH_REGION>", None),
    ("<CAPTION_TO_PHRASE_GROUNDING>", "first"),
    ("<REGION_TO_CATEGORY>", "first"),
    ("<REFERRING_EXPRESSION_SEGMENTATION>", "first"),  # polygons: transformers.js cannot parse them
)


@pytest.fixture(scope="module")
def packs(synthetic_variants_160: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from flonnx.pack import Progress, pack

    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"transformers.js is not installed in {JS / 'node_modules'}: run `make setup`")
    out = tmp_path_factory.mktemp("web_packs")
    return {
        variant: pack(
            synthetic_variants_160, "web", variant=variant, out=out / variant, progress=Progress(quiet=True)
        )
        for variant in VARIANTS
    }


@pytest.fixture(scope="module")
def scenes(packs: dict) -> list[dict]:
    """Requests on scenes at the model's input size, the images saved into every pack."""
    found = []
    for index in range(SCENES):
        scene = synthetic.make_scene(SEED, index)
        image = scene.image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        name = f"scene-{index}.png"
        for result in packs.values():
            image.save(result.folder / name)
        firsts = {}
        for example in synthetic.examples(scene):
            firsts.setdefault(example.task, example)
        for task, text in BROWSER_TASKS:
            if text == "first":
                if task not in firsts:
                    continue
                text = firsts[task].text or firsts[task].region
            path = next(iter(packs.values())).folder / name
            found.append(dict(image=path, task=task, text=text or "", size=image.size))
    return found


def _browse(url: str, requests: list[dict], ui: dict | None = None) -> dict:
    if NODE is None:
        pytest.fail("node is not installed: run `make setup`")
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make setup` (apt-get install chromium)")
    job = {
        "url": url,
        "chromium": CHROMIUM,
        "max_new_tokens": MAX_NEW_TOKENS,
        "requests": [{"image": r["image"].name, "task": r["task"], "text": r["text"]} for r in requests],
        "ui": ui,
    }
    done = subprocess.run(
        [NODE, str(JS / "browser.mjs"), json.dumps(job)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _request(model, request: dict, image=None):
    from flonnx.runtime.model import Request

    image = request["image"] if image is None else image
    text = request["text"] or None
    if request["task"].startswith("<REGION_TO"):
        return Request(image, request["task"], region=text)
    return Request(image, request["task"], text)


def test_layout_is_what_transformers_js_loads_in_a_browser(packs: dict, synthetic_variants_160: Path):
    import onnx

    from flonnx.runtime.manifest import read_manifest, verify_files

    for variant, dtype in VARIANTS.items():
        result = packs[variant]
        model = result.model_folder
        assert model == result.folder / "model"
        manifest = read_manifest(model)
        verify_files(model, manifest, list(manifest["files"]), mode="sha256")
        config = json.loads((model / "config.json").read_text())["transformers.js_config"]
        expected = {component: dtype for component in [*manifest["variants"][variant], "model"]}
        assert config["dtype"] == expected  # "model": transformers.js's session name of encoder_model
        suffix = {"fp32": "", "q8": "_quantized", "q4": "_q4"}[dtype]
        for component, entry in manifest["variants"][variant].items():
            graph = f"{component}{suffix}.onnx"
            assert entry["file"] == f"onnx/{graph}"
            assert entry["data"] == [f"onnx/{graph}_data"]
            assert config["use_external_data_format"][graph] == 1
            # every external tensor of the graph lives in its own data file: nothing shared, nothing
            # in the source folder's files
            proto = onnx.load(str(model / entry["file"]), load_external_data=False)
            locations = {
                item.value
                for tensor in proto.graph.initializer
                if tensor.data_location == onnx.TensorProto.EXTERNAL
                for item in tensor.external_data
                if item.key == "location"
            }
            assert locations == {f"{graph}_data"}, (variant, component, locations)
        # the other configs are the source's, unchanged
        for name in ("preprocessor_config.json", "tokenizer.json", "generation_config.json"):
            assert (model / name).read_bytes() == (synthetic_variants_160 / name).read_bytes()


def test_the_page_loads_nothing_from_elsewhere(packs: dict):
    from flonnx.pack.web import default_node_modules

    folder = packs["int8"].folder
    page = (folder / "app.js").read_text() + (folder / "index.html").read_text()
    assert "https://" not in page and "cdn" not in page.lower()
    assert "env.allowRemoteModels = false" in page
    library = default_node_modules()
    for name, source in {
        "transformers.min.js": library / "@huggingface/transformers/dist/transformers.min.js",
        "ort-wasm-simd-threaded.asyncify.wasm": library
        / "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm",
    }.items():
        assert (folder / "lib" / name).read_bytes() == source.read_bytes()
    notice = (folder / "lib" / "NOTICE.txt").read_text()
    assert "@huggingface/transformers 4.3.2 (Apache-2.0)" in notice and "onnxruntime-web" in notice


def test_tied_table_is_stored_with_each_graph(tiny_export_dir: Path, tmp_path: Path):
    """int8 of a tied checkpoint keeps the 8-bit embedding once for embed_tokens and the decoder; a
    browser cannot share a file between two graphs, so the pack stores it with each, says what it
    costs, and still computes the source's answers."""
    from flonnx.pack import Progress, pack
    from flonnx.quantize.calibration import CALIBRATION_TASKS, calibration_images
    from flonnx.quantize.report import ReportOptions
    from flonnx.quantize.stage import Progress as QuantizeProgress
    from flonnx.quantize.stage import quantize
    from flonnx.runtime.manifest import read_manifest

    source = tmp_path / "export"
    shutil.copytree(tiny_export_dir, source)
    quick = ReportOptions(
        max_new_tokens=4,
        repeats=1,
        decode_repeats=1,
        min_agreement=0,
        min_cosine=0,
        tasks=CALIBRATION_TASKS[:1],
    )
    image = calibration_images()[0][1]
    quantize(source, "int8", images=[image], options=quick, progress=QuantizeProgress(quiet=True))
    listed = read_manifest(source)["variants"]["int8"]
    shared = set(listed["embed_tokens"]["data"]) & set(listed["decoder_model_merged"]["data"])
    assert shared, "the int8 variant no longer shares its embedding table: this test lost its subject"
    result = pack(source, "web", variant="int8", out=tmp_path / "web", progress=Progress(quiet=True))
    details = result.manifest["pack"]
    assert set(details["shared_tables"]) == shared
    assert details["duplicated_bytes"] == (source / next(iter(shared))).stat().st_size > 100_000
    assert f"{details['duplicated_bytes'] / 1e6:.1f} MB more" in (result.folder / "README.md").read_text()
    # onnxruntime-web has no GatherBlockQuantized kernel: the lookup is standard operators in the pack
    assert details["sizes"]["per_component"]["embed_tokens"]["rewritten_lookups"] == 1
    assert result.passed and result.check["equal"] == result.check["total"]
    assert result.check["embed_max_abs_diff"] == 0.0  # every row of the vocabulary, bitwise

    # and the browser runs it
    from flonnx.pack.serve import serve_in_thread, url_of
    from flonnx.runtime.model import Florence2

    side = int(listed_model_size(source))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8))
    image.save(result.folder / "noise.png")
    request = {"image": result.folder / "noise.png", "task": "<OD>", "text": "", "size": image.size}
    server = serve_in_thread(result.folder)
    try:
        page = _browse(url_of(server), [request])
    finally:
        server.shutdown()
        server.server_close()
    assert page["errors"] == []
    ours = Florence2.load(source, variant="int8", threads=1).run_batch(
        [_request(None, request)], max_new_tokens=MAX_NEW_TOKENS, num_beams=1
    )[0]
    # A random model's logits are near ties, and onnxruntime-web's int8 kernels (WebAssembly SIMD)
    # round otherwise than x86's: its answers drift apart after a dozen tokens (17 here). A wrong
    # lookup would differ from the first token on; the trained model's answers are equal throughout.
    their = page["results"][0]["ids"]
    assert len(their) > 6 and their[:6] == ours.tokens[:6]


def listed_model_size(folder: Path) -> int:
    from flonnx.runtime.manifest import read_manifest

    return read_manifest(folder)["model"]["image_size"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_flonnx_runs_the_pack_as_the_source(packs: dict, synthetic_variants_160: Path, variant: str):
    """Every task, greedy and beam search: the pack's graphs compute the source variant's answers."""
    from flonnx.runtime.model import Florence2, Request

    result = packs[variant]
    assert result.passed and result.check["equal"] == result.check["total"] == 4
    source = Florence2.load(synthetic_variants_160, variant=variant, threads=1)
    packed = Florence2.load(result.model_folder, variant=variant, threads=1)
    image = synthetic.make_scene(SEED, 5).image
    requests = [
        Request(
            image,
            task,
            text if not task.startswith("<REGION_TO") else None,
            text if task.startswith("<REGION_TO") else None,
        )
        for task, text in TASKS
    ]
    for beams in (1, 2):
        expected = source.run_batch(requests, max_new_tokens=24, num_beams=beams)
        found = packed.run_batch(requests, max_new_tokens=24, num_beams=beams)
        assert [(r.tokens, r.answer) for r in found] == [(r.tokens, r.answer) for r in expected]


@pytest.mark.parametrize("variant", VARIANTS)
def test_page_answers_as_flonnx(packs: dict, scenes: list[dict], synthetic_variants_160: Path, variant: str):
    """In chromium, over loopback with the pack's own server: every request answered as flonnx answers
    it, the page isolated (threads allowed), nothing fetched from elsewhere, no error; and once
    through the form, as a person uses it: the answer shown and the boxes drawn."""
    from flonnx.pack.serve import serve_in_thread, url_of
    from flonnx.runtime.model import Florence2

    result = packs[variant]
    requests = [{**r, "image": result.folder / r["image"].name} for r in scenes]
    ui_request = next(r for r in requests if r["task"] == "<OD>")
    server = serve_in_thread(result.folder)
    try:
        page = _browse(url_of(server), requests, ui={"image": str(ui_request["image"]), "task": "<OD>"})
    finally:
        server.shutdown()
        server.server_close()
    assert page["errors"] == []
    assert page["isolated"] is True
    model = Florence2.load(synthetic_variants_160, variant=variant, threads=1)
    different = []
    for request, their in zip(requests, page["results"], strict=True):
        ours = model.run_batch([_request(model, request)], max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0]
        different.append(difference(request, their, ours))
    different = [d for d in different if d]
    assert not different, f"{len(different)}/{len(requests)} answers differ:\n" + "\n".join(different)

    ui = page["ui"]
    od = next(r for r, req in zip(page["results"], requests) if req is ui_request)
    assert not ui["error"], ui["status"]
    assert ui["status"].startswith(f"<OD>: {len(od['ids'])} tokens")
    assert json.loads(ui["answer"]) == od["answer"]
    assert ui["canvas"]["width"] == ui["canvas"]["height"] == IMAGE_SIZE
    assert od["answer"]["bboxes"] and ui["canvas"]["box_pixels"] > 0


def test_serve_command_sends_isolation_headers(packs: dict):
    folder = packs["int8"].folder
    command = [sys.executable, "-m", "flonnx.runtime.cli", "pack", str(folder), "--serve", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"serving {folder} at http://127.0.0.1:"), line + server.stderr.read()
        url = line.split(" at ")[1].split()[0]
        types = {}
        for path in (
            "",
            "lib/ort-wasm-simd-threaded.asyncify.wasm",
            "lib/ort-wasm-simd-threaded.asyncify.mjs",
        ):
            with urllib.request.urlopen(url + path) as response:
                assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                types[path] = response.headers["Content-Type"]
        assert types["lib/ort-wasm-simd-threaded.asyncify.wasm"] == "application/wasm"
        assert types["lib/ort-wasm-simd-threaded.asyncify.mjs"] == "text/javascript"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bad_requests_are_refused_clearly(packs: dict, synthetic_variants_160: Path, tmp_path: Path):
    from flonnx.pack import PackError, pack
    from flonnx.pack.serve import make_server
    from flonnx.pack.web import check_fits
    from flonnx.runtime.errors import InputError

    with pytest.raises(PackError, match="--node-modules .* is not a folder"):
        pack(synthetic_variants_160, "web", out=tmp_path / "a", node_modules=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="@huggingface/transformers is not installed in"):
        pack(synthetic_variants_160, "web", out=tmp_path / "a", node_modules=tmp_path / "empty")
    with pytest.raises(InputError, match="static shapes are an option of the mobile target, not of 'web'"):
        pack(synthetic_variants_160, "web", out=tmp_path / "a", static=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(PackError, match="is not a web pack"):
        make_server(synthetic_variants_160)
    with pytest.raises(InputError, match="port must be a whole number from 0 to 65535, got 70000"):
        make_server(packs["int8"].folder, port=70000)
    # what a browser holds: 2 GiB a file, 4 GiB of WebAssembly memory for all four graphs
    gib = 2**30
    base = {
        "vision_encoder": gib // 2,
        "embed_tokens": gib // 10,
        "encoder_model": gib // 4,
        "decoder_model_merged": gib // 2,
    }
    assert check_fits(base, "fp32") == []
    large = {**base, "vision_encoder": 2 * gib // 3, "decoder_model_merged": 3 * gib // 2}
    (warning,) = check_fits(large, "fp32")
    assert "will likely run out of memory" in warning
    with pytest.raises(
        PackError, match="holds 4.27 GiB of weights; a browser's WebAssembly memory holds 4 GiB"
    ):
        check_fits({**large, "encoder_model": 2 * gib}, "fp32")
    with pytest.raises(PackError, match="decoder_model_merged of variant 'fp32' holds 4.50 GiB"):
        check_fits({**base, "decoder_model_merged": 4 * gib + gib // 2}, "fp32")
