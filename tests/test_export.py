"""`flonnx export`: the folder it writes, the validation that guards it, and how it refuses.

The tiny export (`tiny_export_dir`) is shared with the runtime tests. This file adds one full export
at 256x256 (`export_256`, also used as the reference for the validation-failure tests) and two
exports whose validation is made to fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

import flonnx.export.validate as validate_module  # noqa: E402
from flonnx.export.exporter import Progress, export  # noqa: E402
from flonnx.runtime import cli  # noqa: E402
from flonnx.runtime.errors import ExportError, ValidationError  # noqa: E402
from flonnx.runtime.manifest import FORMAT_VERSION  # noqa: E402

GRAPHS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
# DESIGN.md §1: the files every export folder holds.
FOLDER_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "flonnx.json",
    *(f"onnx/{name}.onnx" for name in GRAPHS),
}
PROCESSOR_TABLES = (
    "task_prompts_without_inputs",
    "task_prompts_with_input",
    "tasks_answer_post_processing_type",
    "post_processor_config",
)
# The tiny shape (export/testmodels.py): d_model 64, 2 decoder layers of 4 heads, padded vocabulary.
D_MODEL, LAYERS, HEADS, HEAD_DIM, VOCAB = 64, 2, 4, 16, 51328
# 32 * min(vision grid limit 50, floor(sqrt(1024 positions - 65))) = 32 * 30.
LARGEST_IMAGE_SIZE = 960
PROGRESS_LINE = re.compile(r"^\[ *(\d+\.\d)s\] (\S.*)$")


def quiet() -> Progress:
    return Progress(quiet=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def past_names(prefix: str, kinds=("decoder", "encoder")) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{kv}" for i in range(LAYERS) for kind in kinds for kv in ("key", "value")]


@pytest.fixture(scope="module")
def manifest(tiny_export_dir: Path) -> dict:
    return json.loads((tiny_export_dir / "flonnx.json").read_text())


@pytest.fixture(scope="module")
def export_256(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 256x256 export of the seed-0 checkpoint with --force over a stale folder; (OUT, progress text)."""
    out = tmp_path_factory.mktemp("export_256") / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "stale.txt").write_text("from an older export")
    (out / "onnx" / "stale.onnx").write_bytes(b"not a graph")
    stream = io.StringIO()
    export(str(tiny_model_dir), out, image_size=256, force=True, progress=Progress(stream=stream))
    return out, stream.getvalue()


@pytest.fixture(scope="module")
def seed0_model(tiny_model_dir: Path):
    from transformers import Florence2ForConditionalGeneration

    return Florence2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype="float32").eval()


# --- 1. the exported folder ------------------------------------------------------------------


def test_folder_has_the_design_files_and_nothing_unlisted(tiny_export_dir: Path, manifest: dict) -> None:
    present = {str(p.relative_to(tiny_export_dir)) for p in tiny_export_dir.rglob("*") if p.is_file()}
    assert FOLDER_FILES <= present, f"missing: {sorted(FOLDER_FILES - present)}"
    # The intermediate decoders are merged and removed; no staging or temporary file is left.
    assert not {"onnx/decoder_model.onnx", "onnx/decoder_with_past_model.onnx"} & present
    assert not [name for name in present if Path(name).name.startswith(".")]
    # Every file but the manifest itself is recorded in it, so a reader can verify the whole folder.
    assert set(manifest["files"]) == present - {"flonnx.json"}
    assert not [p for p in tiny_export_dir.parent.iterdir() if p.name.startswith(".")]


def test_manifest_records_every_file_size_and_sha256(tiny_export_dir: Path, manifest: dict) -> None:
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert {f"onnx/{name}.onnx" for name in GRAPHS} <= set(manifest["files"])
    for name, record in manifest["files"].items():
        data = (tiny_export_dir / name).read_bytes()
        assert record["size"] == len(data), name
        assert record["sha256"] == hashlib.sha256(data).hexdigest(), name


def test_manifest_describes_source_and_model(tiny_loc_model_dir: Path, manifest: dict) -> None:
    weights = (tiny_loc_model_dir / "model.safetensors").read_bytes()
    assert manifest["source"]["weights_sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    model = manifest["model"]
    assert (model["image_size"], model["num_image_tokens"]) == (768, 577)
    assert (model["d_model"], model["decoder_layers"], model["decoder_heads"], model["head_dim"]) == (
        D_MODEL,
        LAYERS,
        HEADS,
        HEAD_DIM,
    )
    assert manifest["variants"]["fp32"] == {
        name: {"file": f"onnx/{name}.onnx", "dtype": "fp32", "data": [f"onnx/{name}.onnx.data"]}
        for name in GRAPHS
    }


def test_weights_are_page_aligned_beside_each_graph(tiny_export_dir) -> None:
    """Every weight of 1 KiB or more lives in the graph's .data file at a page boundary, so
    onnxruntime can map it; the graph files themselves hold structure and small constants."""
    for name in GRAPHS:
        model = onnx.load(str(tiny_export_dir / "onnx" / f"{name}.onnx"), load_external_data=False)
        external = [
            {e.key: e.value for e in tensor.external_data}
            for graph in [model.graph, *(a.g for n in model.graph.node for a in n.attribute if a.g.name)]
            for tensor in graph.initializer
            if tensor.data_location == TensorProto.EXTERNAL
        ]
        assert external and all(e["location"] == f"{name}.onnx.data" for e in external)
        assert all(int(e["offset"]) % 4096 == 0 for e in external)
        assert (
            sum(int(e["length"]) for e in external)
            > 0.5 * (tiny_export_dir / "onnx" / f"{name}.onnx.data").stat().st_size
        )


def test_validation_report_passed(manifest: dict) -> None:
    report = manifest["validation"]
    assert report["passed"] is True
    assert set(report["max_abs_diff"]) == set(GRAPHS)
    for graph, diff in report["max_abs_diff"].items():
        assert 0 <= diff < 1e-4, graph
    assert report["checks"] and all(check["passed"] for check in report["checks"])
    # Several shapes per graph, among them a batch of 2.
    for graph in GRAPHS:
        cases = {c["case"] for c in report["checks"] if c["graph"] == graph}
        assert len(cases) >= 2 and any("batch=2" in case for case in cases), graph
    parity = report["token_parity"]
    assert sorted(r["task"] for r in parity) == ["<CAPTION>", "<OD>"]
    for result in parity:
        assert result["equal"] is True and result["tokens"] > 0, result


def test_io_names_are_the_onnx_community_names(tiny_export_dir: Path, manifest: dict) -> None:
    expected = {
        "vision_encoder": ({"pixel_values"}, {"image_features"}),
        "embed_tokens": ({"input_ids"}, {"inputs_embeds"}),
        "encoder_model": ({"inputs_embeds", "attention_mask"}, {"last_hidden_state"}),
        "decoder_model_merged": (
            {
                "inputs_embeds",
                "encoder_hidden_states",
                "encoder_attention_mask",
                "use_cache_branch",
                *past_names("past_key_values"),
            },
            {"logits", *past_names("present")},
        ),
    }
    for name, (inputs, outputs) in expected.items():
        graph = session(tiny_export_dir / "onnx" / f"{name}.onnx")
        actual_inputs = [i.name for i in graph.get_inputs()]
        actual_outputs = [o.name for o in graph.get_outputs()]
        assert set(actual_inputs) == inputs, name
        assert set(actual_outputs) == outputs, name
        # The manifest tells the runtime the same names, in the graph's order.
        assert manifest["io"][name] == {"inputs": actual_inputs, "outputs": actual_outputs}, name


def _dims(values) -> dict[str, list]:
    return {v.name: v.shape for v in values}


def test_batch_sequence_and_past_axes_are_symbolic(tiny_export_dir: Path) -> None:
    def symbolic(dim) -> bool:
        return isinstance(dim, str) and bool(dim)

    shapes = {}
    types = {}
    for name in GRAPHS:
        graph = session(tiny_export_dir / "onnx" / f"{name}.onnx")
        shapes[name] = {**_dims(graph.get_inputs()), **_dims(graph.get_outputs())}
        types[name] = {v.name: v.type for v in [*graph.get_inputs(), *graph.get_outputs()]}

    vision = shapes["vision_encoder"]
    assert symbolic(vision["pixel_values"][0]) and vision["pixel_values"][1:] == [3, 768, 768]
    assert symbolic(vision["image_features"][0]) and vision["image_features"][2] == D_MODEL

    for name in ("input_ids", "inputs_embeds"):
        assert all(symbolic(d) for d in shapes["embed_tokens"][name][:2]), name
    encoder = shapes["encoder_model"]
    for name in ("inputs_embeds", "attention_mask", "last_hidden_state"):
        assert all(symbolic(d) for d in encoder[name][:2]), name
    # The mask and the embeddings share their sequence axis.
    assert encoder["inputs_embeds"][1] == encoder["attention_mask"][1]

    decoder = shapes["decoder_model_merged"]
    assert types["decoder_model_merged"]["use_cache_branch"] == "tensor(bool)"
    assert decoder["use_cache_branch"] == [1]
    for name in ("inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "logits"):
        assert all(symbolic(d) for d in decoder[name][:2]), name
    assert decoder["logits"][2] == VOCAB
    for name in past_names("past_key_values"):
        batch, heads, length, head_dim = decoder[name]
        assert symbolic(batch) and symbolic(length), (name, decoder[name])
        assert (heads, head_dim) == (HEADS, HEAD_DIM), name
    for name in past_names("present"):
        batch, heads, length, head_dim = decoder[name]
        # Encoder presents are real at step 0 and empty later: unnamed, but never fixed.
        assert not isinstance(batch, int) and not isinstance(length, int), (name, decoder[name])
        assert (heads, head_dim) == (HEADS, HEAD_DIM), name
    # Cross-attention cache and encoder states share one length axis; self-attention has its own.
    assert decoder["past_key_values.0.encoder.key"][2] == decoder["encoder_hidden_states"][1]
    assert decoder["past_key_values.0.decoder.key"][2] != decoder["past_key_values.0.encoder.key"][2]


def test_preprocessor_config_has_the_processor_tables(
    tiny_export_dir: Path, tiny_loc_model_dir: Path
) -> None:
    from transformers import AutoProcessor

    source = AutoProcessor.from_pretrained(tiny_loc_model_dir)
    written = json.loads((tiny_export_dir / "preprocessor_config.json").read_text())
    for key in PROCESSOR_TABLES:
        assert key in written, key
        assert written[key] == json.loads(json.dumps(getattr(source, key))), key
    assert "<OD>" in written["task_prompts_without_inputs"]
    assert "{input}" in written["task_prompts_with_input"]["<CAPTION_TO_PHRASE_GROUNDING>"]
    assert written["size"] == {"height": 768, "width": 768}
    assert written["image_seq_length"] == 577
    assert written["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert written["image_std"] == pytest.approx([0.229, 0.224, 0.225])


def _referenced(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _referenced(attribute.g)
    return names


def test_merged_decoder_is_one_if_with_weights_stored_once(tiny_export_dir: Path) -> None:
    path = tiny_export_dir / "onnx" / "decoder_model_merged.onnx"
    model = onnx.load(str(path))
    ifs = [node for node in model.graph.node if node.op_type == "If"]
    assert len(ifs) == 1 and ifs[0].input[0] == "use_cache_branch"
    branches = {a.name: a.g for a in ifs[0].attribute if a.type == onnx.AttributeProto.GRAPH}
    assert set(branches) == {"then_branch", "else_branch"}

    def large(graph: onnx.GraphProto) -> list[TensorProto]:
        return [t for t in graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1000]

    outer = large(model.graph)
    tensors = outer + [t for g in branches.values() for t in large(g)]
    contents = {hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest() for t in tensors}
    assert outer, "no weight is shared between the branches"
    assert len(tensors) == len(contents), "a weight is stored more than once"
    # lm_head, the largest weight, is used by both branches and stored once.
    assert sum(1 for t in tensors if VOCAB in t.dims) == 1

    # Each branch alone would need its own copy of every weight it reads; the file holds one.
    outer_bytes = {t.name: numpy_helper.to_array(t).nbytes for t in outer}
    used = {
        name: sum(n for t, n in outer_bytes.items() if t in _referenced(graph))
        + sum(numpy_helper.to_array(t).nbytes for t in large(graph))
        for name, graph in branches.items()
    }
    assert all(used.values()), used
    assert path.stat().st_size < 0.75 * sum(used.values()), (path.stat().st_size, used)


# --- 2. validation can fail ---------------------------------------------------------------------


def _perturb_largest_weight(path: Path) -> str:
    model = onnx.load(str(path))
    tensor = max(
        (t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT),
        key=lambda t: np.prod(t.dims),
    )
    array = numpy_helper.to_array(tensor) + np.float32(0.5)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(path))
    return tensor.name


def test_graph_validator_names_the_graphs_that_differ(
    export_256: tuple[Path, str], tiny_export_dir: Path, seed0_model, tmp_path: Path
) -> None:
    from flonnx.export.validate import GraphValidator

    onnx_dir = tmp_path / "onnx"
    shutil.copytree(export_256[0] / "onnx", onnx_dir)
    # The decoder of another checkpoint (seed 1) and a vision encoder with one perturbed weight.
    shutil.copy(tiny_export_dir / "onnx" / "decoder_model_merged.onnx", onnx_dir)
    _perturb_largest_weight(onnx_dir / "vision_encoder.onnx")

    validator = GraphValidator(seed0_model, onnx_dir, 256)
    report = validator.run()
    failures = validator.failures()
    assert {f.graph for f in failures} == {"vision_encoder", "decoder_model_merged"}
    assert all(not f.passed and f.max_abs_diff > 1e-4 for f in failures)
    assert {f.output for f in failures if f.graph == "decoder_model_merged"} >= {"logits"}
    assert report["max_abs_diff"]["vision_encoder"] > 1e-2
    assert report["max_abs_diff"]["decoder_model_merged"] > 1e-2
    assert report["max_abs_diff"]["embed_tokens"] < 1e-4
    assert report["max_abs_diff"]["encoder_model"] < 1e-4


def test_token_parity_detects_another_decoder(
    export_256: tuple[Path, str], tiny_export_dir: Path, seed0_model, tmp_path: Path
) -> None:
    from transformers import AutoProcessor

    from flonnx.export.validate import token_parity

    processor = AutoProcessor.from_pretrained(export_256[0])
    assert processor.num_image_tokens == 65
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(export_256[0] / "onnx", onnx_dir)
    shutil.copy(tiny_export_dir / "onnx" / "decoder_model_merged.onnx", onnx_dir)

    results = token_parity(seed0_model, processor, onnx_dir, tasks=("<CAPTION>",), max_new_tokens=8)
    assert len(results) == 1
    assert results[0]["equal"] is False
    assert results[0]["actual"] != results[0]["expected"]


# --- 3. image size ------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [31, 0, 100, 4096, LARGEST_IMAGE_SIZE + 32, "768"])
def test_bad_image_size_is_refused(tiny_model_dir: Path, tmp_path: Path, image_size) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportError) as error:
        export(str(tiny_model_dir), out, image_size=image_size, progress=quiet())
    message = str(error.value)
    assert repr(image_size) in message
    assert f"multiple of 32 from 32 to {LARGEST_IMAGE_SIZE}" in message
    assert "\n" not in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_at_256(export_256: tuple[Path, str]) -> None:
    out, _ = export_256
    manifest = json.loads((out / "flonnx.json").read_text())
    assert manifest["model"]["image_size"] == 256
    assert manifest["model"]["num_image_tokens"] == 65
    assert manifest["validation"]["passed"] is True
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 256, "width": 256}
    assert preprocessor["image_seq_length"] == 65

    vision = session(out / "onnx" / "vision_encoder.onnx")
    (features,) = vision.run(None, {"pixel_values": np.zeros((1, 3, 256, 256), np.float32)})
    assert features.shape == (1, 65, D_MODEL)
    assert np.isfinite(features).all()


def test_force_replaces_the_old_folder_and_cleans_up(export_256: tuple[Path, str]) -> None:
    out, _ = export_256
    assert not (out / "stale.txt").exists()
    assert not (out / "onnx" / "stale.onnx").exists()
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no .out.partial-* or .out.old-*


# --- 4. refusals ---------------------------------------------------------------------------------


def _refused(src, out: Path, **options) -> str:
    with pytest.raises(ExportError) as error:
        export(str(src), out, progress=quiet(), **options)
    message = str(error.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def test_missing_source_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    message = _refused(missing, tmp_path / "out")
    assert str(missing) in message and "not found" in message
    assert not (tmp_path / "out").exists()


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    message = _refused(tmp_path / "src", tmp_path / "out")
    assert "config.json" in message


def test_bart_checkpoint_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "bart"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 64}))
    message = _refused(src, tmp_path / "out")
    assert "not a Florence-2 checkpoint" in message and "'bart'" in message
    assert not (tmp_path / "out").exists()


def test_remote_code_named_by_a_checkpoint_is_never_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A config naming remote code (auto_map) is read as data; the folder's .py files are never imported."""
    src = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, src)
    marker = tmp_path / "ran"
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_florence2.Florence2Config",
        "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
    }
    (src / "config.json").write_text(json.dumps(config))
    for name in ("configuration_florence2.py", "modeling_florence2.py"):
        (src / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    export(str(src), tmp_path / "out", image_size=64, progress=Progress(quiet=True))
    assert not marker.exists()
    assert json.loads((tmp_path / "out" / "flonnx.json").read_text())["source"]["format"] == "native"


def test_corrupted_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, src)
    weights = src / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    message = _refused(src, tmp_path / "out")
    assert "cannot load checkpoint" in message and str(src) in message
    assert not (tmp_path / "out").exists()


def test_non_empty_out_without_force_is_untouched(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "onnx" / "keep.onnx").write_bytes(b"\x00\x01")
    before = snapshot(out)
    message = _refused(tiny_model_dir, out)
    assert "--force" in message and str(out) in message
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_under_a_regular_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    message = _refused(tiny_model_dir, blocker / "out", image_size=256)
    assert str(blocker) in message
    assert blocker.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# --- 5. nothing half-written ----------------------------------------------------------------------


@pytest.fixture
def failing_validation(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make validation fail; records the onnx folder it was given, to prove it was reached."""
    calls: list[Path] = []

    def fail(model, processor, onnx_dir, image_size, *args, **kwargs):
        calls.append(Path(onnx_dir))
        assert {p.name for p in Path(onnx_dir).iterdir()} >= {f"{name}.onnx" for name in GRAPHS}
        raise ValidationError("validation failed:\n  decoder_model_merged: made up", {"passed": False})

    monkeypatch.setattr(validate_module, "validate_export", fail)
    return calls


def test_failed_validation_leaves_nothing(tiny_model_dir: Path, tmp_path: Path, failing_validation) -> None:
    out = tmp_path / "out"
    stream = io.StringIO()
    with pytest.raises(ValidationError):
        export(str(tiny_model_dir), out, image_size=256, progress=Progress(stream=stream, quiet=True))
    assert len(failing_validation) == 1
    staging = failing_validation[0].parent
    assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert stream.getvalue() == ""  # quiet means quiet


def test_failed_validation_with_force_keeps_the_old_folder(
    tiny_model_dir: Path, tmp_path: Path, failing_validation
) -> None:
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "flonnx.json").write_text('{"format_version": 1}')
    (out / "onnx" / "vision_encoder.onnx").write_bytes(b"old graph")
    before = snapshot(out)
    with pytest.raises(ValidationError):
        export(str(tiny_model_dir), out, image_size=256, force=True, progress=quiet())
    assert len(failing_validation) == 1
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- 6. command line ------------------------------------------------------------------------------


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing, out = tmp_path / "missing", tmp_path / "out"
    assert cli.main(["export", str(missing), str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("flonnx export: error:") and str(missing) in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_cli_debug_raises(tmp_path: Path) -> None:
    with pytest.raises(ExportError):
        cli.main(["export", "--debug", "--quiet", str(tmp_path / "missing"), str(tmp_path / "out")])


def test_cli_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("SRC", "OUT", "--image-size", "--force", "--quiet"):
        assert option in out, option


def test_console_script_error_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "flonnx.runtime.cli", "export", "/nonexistent", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[-1] == "flonnx export: error: checkpoint folder not found: /nonexistent"
    assert len(lines) == 1, f"the error should be the only line on stderr, got: {lines}"
    assert not out.exists()


# --- 7. progress ------------------------------------------------------------------------------------


def test_progress_writes_to_the_current_stderr() -> None:
    # The default stream must be looked up when a line is written, not when the module is imported:
    # otherwise redirect_stderr, capsys and any later replacement of sys.stderr miss the progress lines.
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        Progress()("a stage")
    assert PROGRESS_LINE.match(stream.getvalue()), (
        f"Progress() wrote to the sys.stderr of import time, not the current one: {stream.getvalue()!r}"
    )


def test_progress_has_a_timed_line_per_stage(export_256: tuple[Path, str]) -> None:
    lines = export_256[1].splitlines()
    parsed = [PROGRESS_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, match in zip(lines, parsed) if not match]
    seconds = [float(match.group(1)) for match in parsed]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    messages = [match.group(2) for match in parsed]
    stages = [
        "loading",
        "exporting vision_encoder",
        "exporting embed_tokens",
        "exporting encoder_model",
        "exporting decoder_model",
        "exporting decoder_with_past_model",
        "merging",
        "writing configs",
        "validating",
        "validation passed",
        "done",
    ]
    positions = [next((i for i, m in enumerate(messages) if m.startswith(stage)), None) for stage in stages]
    assert None not in positions, dict(zip(stages, positions))
    assert positions == sorted(positions)
    assert "<CAPTION>" in messages[positions[stages.index("validation passed")]]


# -- folding run-time Reshape shapes ------------------------------------------------------------------


def _reshape_model(shape_source: str, first_index: int):
    """y = Reshape(x, [dim first_index of shape_source, dim 1 of shape_source, 4, 2])."""
    from onnx import helper

    nodes, parts = [], []
    for position, index in enumerate((first_index, 1)):
        nodes += [
            helper.make_node("Shape", [shape_source], [f"s{position}"]),
            helper.make_node("Gather", [f"s{position}", f"i{index}"], [f"g{position}"], axis=0),
            helper.make_node("Unsqueeze", [f"g{position}", "axes"], [f"u{position}"]),
        ]
        parts.append(f"u{position}")
    nodes += [
        helper.make_node("Concat", [*parts, "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Identity", ["x2"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", "t", 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(np.array(0, np.int64), "i0"),
            numpy_helper.from_array(np.array(1, np.int64), "i1"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([4, 2], np.int64), "tail"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reshape_of_its_own_dimensions_becomes_a_constant_shape():
    from flonnx.export.simplify import fold_reshape_shapes

    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    model = _reshape_model("x", 0)
    assert fold_reshape_shapes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Reshape", "Identity"]
    shape = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[1])
    assert numpy_helper.to_array(shape).tolist() == [0, 0, 4, 2]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["y"], {"x": x, "x2": x})[0], x.reshape(2, 3, 4, 2))


@pytest.mark.parametrize("source, first_index", [("x2", 0), ("x", 1)])
def test_reshape_of_other_dimensions_is_left_alone(source, first_index):
    """Another tensor's dimensions, or dimension 1 at position 0: a 0 would copy the wrong one."""
    from flonnx.export.simplify import fold_reshape_shapes

    model = _reshape_model(source, first_index)
    before = model.SerializeToString()
    assert fold_reshape_shapes(model) == 0
    assert model.SerializeToString() == before


def test_exported_decoder_computes_no_reshape_shapes_per_step(tiny_export_dir):
    model = onnx.load(str(tiny_export_dir / "onnx" / "decoder_model_merged.onnx"))
    branch = {a.name: a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute}["then_branch"]
    producers = {o: n for n in branch.node for o in n.output}
    reshapes = [n for n in branch.node if n.op_type == "Reshape"]
    assert reshapes and not any(n.input[1] in producers for n in reshapes)


# Stages 16/8/4/2 tokens wide at 64 px, all padded to 12x12 windows; at 96 px 24 and 12 fit exactly.
@pytest.mark.parametrize("size", [64, 96])
def test_channels_last_vision_wrapper_is_transformers_get_image_features(seed0_model, size):
    import torch

    from flonnx.export.graphs import VisionEncoder

    pixels = torch.from_numpy(
        np.random.default_rng(size).standard_normal((2, 3, size, size), dtype=np.float32)
    )
    with torch.no_grad():
        expected = seed0_model.get_image_features(pixels).pooler_output
        actual = VisionEncoder(seed0_model).eval()(pixels)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_exported_vision_changes_layout_only_around_convolutions(tiny_export_dir):
    from onnx import helper

    model = onnx.load(str(tiny_export_dir / "onnx" / "vision_encoder.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def beside_a_conv(node):
        before = producers.get(node.input[0])
        return (before is not None and before.op_type == "Conv") or all(
            n.op_type == "Conv" for n in consumers[node.output[0]]
        )

    layout = [
        n
        for n in model.graph.node
        if n.op_type == "Transpose"
        and "attn" not in n.name  # the attentions' own head transposes are not layout switches
        and tuple(helper.get_attribute_value(n.attribute[0])) in {(0, 3, 1, 2), (0, 2, 3, 1), (0, 2, 1)}
    ]
    assert sum(n.op_type == "Conv" for n in model.graph.node) >= 8
    # Beside a convolution onnxruntime folds them into its NCHWc reorders. transformers switches
    # [B,C,H,W] <-> [B,N,C] four times per block half; what is left is the projector's pair.
    assert len([n.name for n in layout if not beside_a_conv(n)]) == 2


def test_vision_stages_in_bands_equal_transformers_and_quantize_whole(
    seed0_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A band budget small enough that the tiny model's first stages run in bands (the last
    window band padded): the wrapper still equals transformers, and every band's MatMul reads its
    weight directly (what the int8 quantizer needs to quantize it)."""
    import torch

    from flonnx.export import graphs
    from flonnx.export.exporter import GraphSpec, export_graph, simplify_file

    # Stage 0 at 128x128 (32x32 tokens, 64 wide): MLP bands of 8 rows, window bands of 12, 12, 8.
    monkeypatch.setattr(graphs, "BAND_VALUES", 8 * 32 * 64)
    pixels = torch.randn(2, 3, 128, 128)
    wrapper = graphs.VisionEncoder(seed0_model).eval()
    with torch.no_grad():
        expected = seed0_model.get_image_features(pixels).pooler_output
        torch.testing.assert_close(wrapper(pixels), expected, atol=1e-5, rtol=1e-4)
    path = tmp_path / "vision_encoder.onnx"
    spec = GraphSpec(
        "vision_encoder",
        wrapper,
        (pixels,),
        ["pixel_values"],
        ["image_features"],
        {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
    )
    export_graph(spec, path)
    simplify_file(path)
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    # Per stage: MLP and channel attention bands 4, 2, 1 (two blocks), 1; window attention bands
    # 3, 2, 1 (two blocks), 1. One softmax per channel attention, its scores summed over bands.
    bands, window_bands, channel_halves = 4 + 2 + 2 + 1, 3 + 2 + 2 + 1, 5
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Erf") == 2 * bands
    assert ops.count("Softmax") == window_bands + channel_halves
    assert not [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in weights]
    fc = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    # fc1 and fc2 per MLP band, qkv and proj per attention band, the projection
    assert len(fc) == 2 * 2 * bands + 2 * (window_bands + bands) + 1
    (features,) = session(path).run(None, {"pixel_values": pixels[:1].numpy()})
    np.testing.assert_allclose(features, expected[:1].numpy(), atol=1e-4)


def test_weight_identities_are_folded() -> None:
    from onnx import helper

    from flonnx.export.simplify import fold_weight_identities

    weight = np.arange(4, dtype=np.float32).reshape(2, 2)
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["w"], ["w_copy"]),
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["x", "w_copy"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_weight_identities(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul", "Add"]
    assert model.graph.node[1].input[1] == "w"
    onnx.checker.check_model(model)
