"""`flonnx pack FOLDER --target mobile`: ORT-format packs of the tiny export's fp32 and int8 variants
answer as their source on every task, carry a real reduced-build config, build lines, a usability
report and the cost of the tied table stored twice; `--static` fixes the vision encoder's shapes;
errors are one line; an interrupted pack leaves nothing half-written."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tasks import TASKS

from flonnx.runtime import cli
from flonnx.runtime.manifest import read_manifest, sha256_file, verify_files
from flonnx.runtime.model import Florence2, Request

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from flonnx.pack import PackError, Progress, pack  # noqa: E402
from flonnx.pack.mobile import CONFIG, USABILITY, read_operator_config  # noqa: E402

MAX_NEW_TOKENS = 40
QUIET = Progress(quiet=True)
COMPONENTS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")


def _image(seed: int, size=(400, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def export(tiny_export_dir, tmp_path_factory) -> Path:
    """A copy of the tiny export with an int8 variant (quick report settings)."""
    from flonnx.quantize.calibration import CALIBRATION_TASKS, calibration_images
    from flonnx.quantize.report import ReportOptions
    from flonnx.quantize.stage import Progress as QuantizeProgress
    from flonnx.quantize.stage import quantize

    folder = tmp_path_factory.mktemp("pack_source") / "export"
    shutil.copytree(tiny_export_dir, folder)
    quick = {"max_new_tokens": 4, "repeats": 1, "decode_repeats": 1, "min_agreement": 0, "min_cosine": 0}
    options = ReportOptions(**quick, tasks=CALIBRATION_TASKS[:1])
    image = calibration_images()[0][1]
    quantize(folder, "int8", images=[image], options=options, progress=QuantizeProgress(quiet=True))
    return folder


@pytest.fixture(scope="module")
def packs(export, tmp_path_factory) -> dict:
    """The int8 pack runs its built-in check (asserted below); the fp32 ones are compared here."""
    root = tmp_path_factory.mktemp("packs")
    made = {}
    for name, variant, static in [("int8", "int8", False), ("fp32", "fp32", False), ("static", "fp32", True)]:
        made[name] = pack(
            export,
            "mobile",
            variant=variant,
            out=root / name,
            static=static,
            check=name == "int8",
            threads=2,
            progress=QUIET,
        )
    return made


def _answers(model: Florence2, image) -> list:
    return [
        model.run_batch([Request(image, task, text)], max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0]
        for task, text in TASKS
    ]


def _assert_same(expected: list, found: list) -> None:
    for a, b in zip(expected, found, strict=True):
        assert (a.task, a.tokens, a.answer) == (b.task, b.tokens, b.answer)


@pytest.fixture(scope="module")
def fp32_answers(export) -> list:
    return _answers(Florence2.load(export, variant="fp32", threads=2), _image(0))


@pytest.mark.parametrize("name", ["fp32", "static"])
def test_fp32_packs_answer_as_the_source_on_every_task(packs, fp32_answers, name):
    packed = Florence2.load(packs[name].folder, threads=2)  # the runtime's default variant: fp32
    assert packed.variant == "fp32" and packed.folder == packs[name].folder
    _assert_same(fp32_answers, _answers(packed, _image(0)))


def test_int8_pack_answers_as_the_source_on_every_task(export, packs):
    """On an ARM device both run the same kernels. On this x86 machine onnxruntime runs the source's
    convolutions in its NCHWc layout (the pack, made for ARM, does not), and the int8 vision
    encoder's dynamic quantization turns those float differences into flipped steps: so the vision
    encoder is compared with the source graph run without that layout (bit for bit), and the rest
    of the pipeline on the same image features (every task)."""
    image = _image(0)
    source = Florence2.load(export, variant="int8", threads=2)
    packed = Florence2.load(packs["int8"].folder, variant="int8", threads=2, verify="sha256")
    features = packed.encode_image(image)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    graph = export / read_manifest(export)["variants"]["int8"]["vision_encoder"]["file"]
    as_on_arm = ort.InferenceSession(
        str(graph), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )
    pixels = source.preprocessor([image]).pixel_values
    np.testing.assert_array_equal(as_on_arm.run(None, {"pixel_values": pixels})[0][0], features.features)
    _assert_same(_answers(source, features), _answers(packed, features))
    check = packs["int8"].check
    assert packs["int8"].passed and check["equal"] == check["total"] == 4
    assert check["vision_max_abs_diff"]["converted_as_on_arm"] == 0


def test_pack_lists_its_ort_files_and_verifies_them(export, packs):
    for result in packs.values():
        manifest = read_manifest(result.folder)
        entry = manifest["variants"][result.variant]
        assert list(entry) == list(COMPONENTS)
        files = [entry[c]["file"] for c in COMPONENTS]
        assert all(f.startswith("ort/") and f.endswith(".ort") for f in files)
        assert "data" not in json.dumps(entry)  # the ORT format has no external data
        verify_files(result.folder, manifest, list(manifest["files"]), full=True)
        assert {*files, CONFIG, *USABILITY, "README.md", "tokenizer.json", "config.json"} <= set(
            manifest["files"]
        )
        assert not list(result.folder.rglob("*.onnx*")) and not (result.folder / ".work").exists()
        assert manifest["pack"]["source"]["variant"] == result.variant
        assert manifest["pack"]["source"]["files"] == {
            name: sha256_file(export / name) for name in manifest["pack"]["source"]["files"]
        }
    # a damaged .ort file is caught at load, as any listed file
    damaged = packs["fp32"].folder.parent / "damaged"
    shutil.copytree(packs["fp32"].folder, damaged)
    ort_file = damaged / read_manifest(damaged)["variants"]["fp32"]["decoder_model_merged"]["file"]
    data = bytearray(ort_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ort_file.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        Florence2.load(damaged, verify="sha256")


def test_operator_config_names_real_operators_with_their_types(packs):
    schemas = {
        (s.domain or "ai.onnx", s.name) for s in ort.capi.onnxruntime_pybind11_state.get_all_operator_schema()
    }
    for result in packs.values():
        text = (result.folder / CONFIG).read_text()
        config = read_operator_config(text)
        ops = {(domain, op) for domain, opsets in config.items() for ops in opsets.values() for op in ops}
        assert ops and ops <= schemas, ops - schemas
        assert {("ai.onnx", "Conv"), ("ai.onnx", "Gather"), ("ai.onnx", "If")} <= ops
        assert '{"inputs": {"0": ["float"]}}' in text  # type reduction: the types each kernel takes
        assert all(line.startswith("# - ort/") for line in text.splitlines()[1:5])
        summary = result.manifest["pack"]["operators"]
        assert summary["operators"] == len(ops)
    int8 = read_operator_config((packs["int8"].folder / CONFIG).read_text())["com.microsoft"]
    assert {"MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul"} <= {
        o for v in int8.values() for o in v
    }


def test_readme_has_the_reduced_build_lines(packs):
    text = (packs["int8"].folder / "README.md").read_text()
    for flag in (
        f"git checkout v{ort.__version__}",
        "./build.sh --config MinSizeRel",
        "--android --android_sdk_path",
        "--android_abi arm64-v8a",
        "--use_nnapi",
        "--ios --apple_sysroot iphoneos --osx_arch arm64",
        "--use_coreml",
        "--build_apple_framework",
        "--minimal_build extended",
        f'--include_ops_by_config "$PACK/{CONFIG}" --enable_reduced_operator_type_support',
        "--disable_ml_ops --disable_exceptions --disable_rtti",
        "--variant int8",
    ):
        assert flag in text, flag
    assert "answers given the same image features: 4/4 equal" in text


def test_usability_report_says_what_nnapi_and_coreml_take(packs):
    for name, result in packs.items():
        findings = json.loads((result.folder / USABILITY[0]).read_text())
        assert list(findings) == list(COMPONENTS)
        for component in COMPONENTS:
            providers = findings[component]["providers"]
            assert list(providers) == ["NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"]
            assert all(p.get("with_fixed_shapes") or p["verdict"] for p in providers.values())
        vision = findings["vision_encoder"]
        if name == "static":
            assert vision["dynamic_inputs"] == {} and vision["dynamic_values"] == 0
        else:
            assert vision["dynamic_inputs"] == {"pixel_values": ["batch_size", 3, 768, 768]}
            nnapi = vision["providers"]["NNAPI"]
            assert nnapi["with_fixed_shapes"]["supported_nodes"] > nnapi["supported_nodes"]
        assert findings["decoder_model_merged"]["dynamic_inputs"]  # the cache grows every step
        text = (result.folder / USABILITY[1]).read_text()
        assert "Checking NNAPI" in text and "partitions" in text


def test_tied_table_is_stored_in_both_graphs_and_its_cost_reported(export, packs):
    details = packs["int8"].manifest["pack"]
    ((table, shared),) = details["shared_tables"].items()
    assert shared == {
        "bytes": (export / table).stat().st_size,
        "read_by": ["embed_tokens", "decoder_model_merged"],
    }
    assert details["duplicated_bytes"] == shared["bytes"] > 1_000_000
    files = packs["int8"].manifest["files"]
    entry = packs["int8"].manifest["variants"]["int8"]
    for component in shared["read_by"]:
        assert files[entry[component]["file"]]["size"] > shared["bytes"]
    assert details["sizes"]["pack_graphs"] > details["sizes"]["source_variant"] + shared["bytes"] * 0.9
    assert packs["fp32"].manifest["pack"]["duplicated_bytes"] == 0  # fp32 keeps a table per graph already
    assert "stored in both files here" in (packs["int8"].folder / "README.md").read_text()


def test_static_vision_encoder_has_fixed_shapes(packs):
    result = packs["static"]
    vision = result.folder / result.manifest["variants"]["fp32"]["vision_encoder"]["file"]
    session = ort.InferenceSession(str(vision), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, 768, 768]]
    assert [o.shape for o in session.get_outputs()] == [[1, 577, 64]]
    assert result.manifest["pack"]["static"] == {
        "vision_encoder": {"pixel_values": [1, 3, 768, 768], "image_features": [1, 577, 64]}
    }
    dynamic = result.folder / result.manifest["variants"]["fp32"]["encoder_model"]["file"]
    assert (
        ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[0]
        == "batch_size"
    )


def test_flonnx_run_runs_a_pack(packs, tmp_path, capsys):
    path = tmp_path / "image.png"
    _image(3).save(path)
    folder = packs["int8"].folder
    args = ["run", str(folder), str(path), "--task", "<OD>", "--variant", "int8", "--max-new-tokens", "8"]
    assert cli.main(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    expected = Florence2.load(folder, variant="int8").run(str(path), "<OD>", max_new_tokens=8)
    assert json.loads(line) == {"image": str(path), **expected}


def test_pack_command_prints_a_summary(export, tmp_path, capsys):
    out = tmp_path / "cli-pack"
    args = [
        "pack",
        str(export),
        "--target",
        "mobile",
        "--out",
        str(out),
        "--quiet",
        "--no-check",
        "--threads",
        "1",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}: variant 'int8'" in printed and "tables stored twice" in printed and CONFIG in printed
    assert read_manifest(out)["pack"]["check"] is None
    default = pack(export, "mobile", variant="fp32", check=False, progress=QUIET)
    assert default.folder == export.parent / "export-mobile-fp32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "desktop"], "unknown target 'desktop'; expected one of: mobile, web"),
        ([], "--target is required: one of mobile, web (or --serve a web pack)"),
        (["--target", "mobile", "--serve"], "--serve serves a web pack; --target is 'mobile'"),
        (["--serve"], "is not a web pack (no index.html, app.js): make one with"),
        (
            ["--target", "mobile", "--variant", "int4"],
            "unknown variant 'int4' for {export}; available: fp32, int8",
        ),
        (["--target", "mobile", "--out", "{export}/inside"], "must be outside the model folder {export}"),
        (
            ["--target", "mobile", "--out", "{existing}"],
            "exists and is not empty; pass --force to replace it",
        ),
        (["--target", "mobile", "--threads", "0"], "threads must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(export, tmp_path, capsys, args, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    fill = {"export": export, "existing": existing}
    assert cli.main(["pack", str(export), *(a.format(**fill) for a in args)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flonnx pack: error: ") and message.format(**fill) in line
    assert (existing / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*partial*")) and not list(export.parent.glob(".*partial*"))


def test_missing_pack_extra_is_named(tmp_path):
    code = "import sys\nsys.modules['onnx'] = None\nfrom flonnx.runtime.cli import main\n"
    code += "sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "pack", "FOLDER", "--target", "mobile"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "flonnx pack: error: this needs the 'pack' extra (onnx is missing): in a flonnx clone, pip install "
        "'.[pack]' (or pip install 'flonnx-VERSION-py3-none-any.whl[pack]')"
    ]


def test_runtime_never_imports_the_pack():
    code = "import sys, flonnx.runtime, flonnx.runtime.model, flonnx.runtime.cli, flonnx.runtime.info\n"
    code += "print('flonnx.pack' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout == "False\n"


@pytest.mark.parametrize("failure", [KeyboardInterrupt, PackError])
def test_interrupted_pack_leaves_nothing_half_written(export, packs, tmp_path, monkeypatch, failure):
    """Stopped in the middle (after the graphs are converted): no OUT, no staging folder; a previous
    OUT replaced with --force is untouched."""
    import flonnx.pack.mobile

    def stop(*args, **kwargs):
        raise failure("stopped")

    monkeypatch.setattr(flonnx.pack.mobile, "analyze", stop)
    out = tmp_path / "pack"
    with pytest.raises(failure):
        pack(export, "mobile", out=out, check=False, progress=QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    shutil.copytree(packs["fp32"].folder, out)
    before = {p.name: sha256_file(p) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(failure):
        pack(export, "mobile", out=out, force=True, check=False, progress=QUIET)
    assert {p.name: sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_killed_pack_is_cleared_by_the_next_run(export, tmp_path):
    out = tmp_path / "pack"
    command = [sys.executable, "-m", "flonnx.runtime.cli", "pack", str(export), "--target", "mobile"]
    command += ["--out", str(out), "--quiet", "--no-check", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".pack.partial-*/ort/*.ort")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # killed while converting: only the hidden staging folder is left
    assert subprocess.run(command, stdout=subprocess.DEVNULL).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]
    verify_files(out, read_manifest(out), list(read_manifest(out)["files"]), full=True)
