"""`flonnx quantize` on the tiny export: recipes, overrides, the manifest, atomicity, failures, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from flonnx.quantize import RECIPES, QuantizeError, ReportOptions, get_recipe, measure, quantize  # noqa: E402
from flonnx.quantize.calibration import calibration_images  # noqa: E402
from flonnx.quantize.quantizer import (  # noqa: E402
    find_role,
    float_bytes,
    iter_graphs,
    pack_nbits,
    quantize_component,
)
from flonnx.quantize.recipes import ComponentRecipe, Recipe, parse_overrides  # noqa: E402
from flonnx.quantize.stage import Progress  # noqa: E402
from flonnx.runtime import cli  # noqa: E402
from flonnx.runtime.errors import InputError, ModelFolderError  # noqa: E402
from flonnx.runtime.manifest import COMPONENTS, file_record, read_manifest, verify_files, write_json_atomic  # noqa: E402
from flonnx.runtime.model import Florence2, Request  # noqa: E402

REGION = "<loc_100><loc_150><loc_700><loc_900>"
# Quick report settings: one image, short generations, few timing runs. The tiny random model's
# logits have many near-ties, so its agreement is lower than a trained model's.
FAST = ReportOptions(max_new_tokens=8, repeats=1, decode_repeats=2, min_agreement=0.5, min_cosine=0.95)
QUIET = Progress(quiet=True)
INTEGER_RECIPES = ("int8", "int4")


def _image():
    return calibration_images()[0][1]


def _copy(folder: Path, tmp_path: Path, name: str = "export") -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def _run(folder, recipe="int8", **kwargs):
    kwargs.setdefault("images", [_image()])
    kwargs.setdefault("options", FAST)
    return quantize(folder, recipe, progress=QUIET, **kwargs)


def _fp32_records(folder: Path) -> dict:
    manifest = read_manifest(folder)
    return {e["file"]: manifest["files"][e["file"]] for e in manifest["variants"]["fp32"].values()}


def _assert_consistent(folder: Path) -> dict:
    """Every file the manifest lists matches its record, and no temporary file is left."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest, list(manifest["files"]), full=True)
    for variant in manifest["variants"].values():
        assert {e["file"] for e in variant.values()} <= set(manifest["files"])
    assert not list(folder.rglob("*.partial-*"))
    return manifest


@pytest.fixture(scope="module")
def quantized(tiny_export_dir, tmp_path_factory) -> Path:
    """A copy of the tiny export with the int8 and int4 variants (fp16, q4f16: test_quantize_fp16.py)."""
    folder = _copy(tiny_export_dir, tmp_path_factory.mktemp("quantized"))
    for recipe in INTEGER_RECIPES:
        _run(folder, recipe)
    return folder


# -- recipes --------------------------------------------------------------------------------------


def test_recipes_are_validated_presets():
    assert set(RECIPES) == {"int8", "int4", "fp16", "q4f16"}
    assert get_recipe("int8").suffix == "_quantized" and get_recipe("int4").suffix == "_q4"
    decoder = get_recipe("int4").component("decoder_model_merged")
    assert decoder.matmul_bits == 4 and set(decoder.eight_bit_roles) == {"lm_head", "cross_attention_kv"}
    vision = get_recipe("int8").component("vision_encoder")
    assert not vision.conv_weights_int8 and vision.matmul_bits == 8
    assert (
        get_recipe("int8")
        .with_overrides({"vision_encoder": "int4"})
        .component("vision_encoder")
        .conv_weights_int8
    )
    with pytest.raises(InputError, match="int8, int4"):
        get_recipe("int3")
    with pytest.raises(InputError, match="matmul_bits"):
        ComponentRecipe("int8", matmul_bits=5)
    with pytest.raises(InputError, match="power of two"):
        ComponentRecipe("int4", matmul_bits=4, kernel="nbits", block_size=48)
    with pytest.raises(InputError, match="kernel='nbits'"):
        ComponentRecipe("int4", matmul_bits=4)
    with pytest.raises(InputError, match="cannot quantize"):
        ComponentRecipe("fp32", matmul_bits=8)


def test_overrides_are_parsed_and_checked():
    assert parse_overrides(["vision_encoder=fp32", "decoder_model_merged = int8"]) == {
        "vision_encoder": "fp32",
        "decoder_model_merged": "int8",
    }
    recipe = get_recipe("int4").with_overrides({"vision_encoder": "fp32"})
    assert recipe.component("vision_encoder").dtype == "fp32" and recipe.overrides == {
        "vision_encoder": "fp32"
    }
    for bad, fragment in [
        ("vision=fp32", "vision_encoder, embed_tokens"),
        ("vision_encoder=fp8", "fp32, int8, int4, fp16, q4f16"),
        ("embed_tokens=int4", "expected one of: fp32, int8"),
        ("vision_encoder", "COMPONENT=DTYPE"),
    ]:
        with pytest.raises(InputError, match=fragment):
            parse_overrides([bad])


# -- graph operations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_packing_matches_onnxruntime(bits):
    """Our MatMulNBits packing, run by onnxruntime, equals x @ the dequantized weight."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows, cols, block = 100, 24, 32
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    codes, scales = pack_nbits(weight, bits, block)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "s"],
        ["y"],
        domain="com.microsoft",
        K=rows,
        N=cols,
        bits=bits,
        block_size=block,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, rows)).astype(np.float32)
    # dequantize by hand: symmetric codes around 2^(bits-1)
    padded = np.zeros((cols, 128), np.float32)
    unpacked = codes.reshape(cols, -1)
    if bits == 4:
        unpacked = np.stack([unpacked & 15, unpacked >> 4], axis=-1).reshape(cols, -1)
    values = (unpacked.astype(np.float32) - (1 << (bits - 1))).reshape(cols, -1, block) * scales[..., None]
    padded[:, :] = values.reshape(cols, -1)
    dequantized = padded[:, :rows].T
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequantized, rtol=1e-4, atol=1e-4)
    error = np.abs(dequantized - weight).max() / np.abs(weight).max()
    assert error < (0.08 if bits == 4 else 0.005)


def test_roles_are_found_by_structure(tiny_export_dir):
    decoder = onnx.load(str(tiny_export_dir / "onnx" / "decoder_model_merged.onnx"))
    layers = read_manifest(tiny_export_dir)["model"]["decoder_layers"]
    vocab = read_manifest(tiny_export_dir)["model"]["vocab_size"]
    assert len(find_role(decoder, "lm_head", vocab)) == 2  # one per branch, one shared weight
    cross = find_role(decoder, "cross_attention_kv", vocab)
    assert len(cross) == 2 * layers and all(name.startswith("no_past/") for name in cross)
    encoder = onnx.load(str(tiny_export_dir / "onnx" / "encoder_model.onnx"))
    with pytest.raises(QuantizeError, match="lm_head"):
        find_role(encoder, "lm_head", vocab)


def test_merged_decoder_weights_are_quantized_once_in_the_outer_graph(tiny_export_dir):
    """The branches' shared weights live in the outer graph: each is replaced by one quantized copy."""
    decoder = onnx.load(str(tiny_export_dir / "onnx" / "decoder_model_merged.onnx"))
    vocab = read_manifest(tiny_export_dir)["model"]["vocab_size"]
    for name in INTEGER_RECIPES:
        quantized = quantize_component(decoder, get_recipe(name).component("decoder_model_merged"), vocab)
        assert float_bytes(quantized) < float_bytes(decoder) / 20
        names = [t.name for g in iter_graphs(quantized.graph) for t in g.initializer]
        assert len(names) == len(set(names))
        assert quantized.ByteSize() < decoder.ByteSize() / (3 if name == "int8" else 2)


# -- the stage ----------------------------------------------------------------------------------------


def test_every_task_runs_on_every_variant(quantized):
    manifest = read_manifest(quantized)
    assert set(manifest["variants"]) == {"fp32", "int8", "int4"}
    for variant in ("int8", "int4"):
        model = Florence2.load(quantized, variant=variant, threads=2, verify="sha256")
        features = model.encode_image(_image())
        with_input = set(model.tasks.prompts_with_input)
        requests = [
            Request(
                features,
                task,
                REGION
                if task in model.tasks.region_tasks
                else ("a red circle" if task in with_input else None),
            )
            for task in model.tasks.tasks
        ]
        results = model.run_batch(requests, max_new_tokens=6, num_beams=1)
        assert len(results) == len(requests) == 15 and all(r.tokens[0] == 2 for r in results)


def test_manifest_records_recipe_dtypes_files_and_report(quantized):
    manifest = _assert_consistent(quantized)
    assert manifest["variants"]["int8"]["vision_encoder"] == {
        "file": "onnx/vision_encoder_quantized.onnx",
        "dtype": "int8",
        "data": ["onnx/vision_encoder_quantized.onnx.data"],
    }
    assert manifest["variants"]["int4"]["decoder_model_merged"] == {
        "file": "onnx/decoder_model_merged_q4.onnx",
        "dtype": "int4",
        # the tied table, then the graph's own weights
        "data": ["onnx/embed_tokens_q4.onnx.data", "onnx/decoder_model_merged_q4.onnx.data"],
    }
    assert manifest["variants"]["int4"]["vision_encoder"]["dtype"] == "int8"
    fp32 = manifest["variants"]["fp32"]
    for name, record in manifest["quantization"].items():
        assert record["recipe"]["name"] == name
        assert record["source"] == {
            fp32[c]["file"]: manifest["files"][fp32[c]["file"]]["sha256"] for c in COMPONENTS
        }
        bytes_ = record["float_bytes"]["decoder_model_merged"]
        assert bytes_["quantized"] < bytes_["fp32"] / 20
        report = record["report"]
        assert {c["component"] for c in report["components"]} == set(COMPONENTS)
        assert [t["task"] for t in report["tasks"]] == ["<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>"]
        assert {t["stage"] for t in report["timings"]} == {"vision_encoder", "encoder_model", "decode_step"}
        assert report["size"] < report["fp32_size"] / 2
        files = manifest["files"]
        counted = set()
        for component in report["components"]:
            # d_model 64 leaves 4-bit blocks of 32 little to average over: the tiny int4 is coarse
            assert component["cosine"] > (0.99 if name == "int8" else 0.9)
            # a graph's size counts its data files; the shared table once, with embed_tokens
            entry = manifest["variants"][name][component["component"]]
            own = [f for f in [entry["file"], *entry.get("data", [])] if f not in counted]
            counted.update(own)
            assert component["size"] == sum(files[f]["size"] for f in own)
            if entry["dtype"] != "fp32":
                graph = onnx.load(str(quantized / entry["file"]), load_external_data=False)
                inline = [
                    t.name
                    for g in iter_graphs(graph.graph)
                    for t in g.initializer
                    if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= 1024
                ]
                assert not inline  # every weight of 1 KiB or more is beside the graph
        assert report["size"] == sum(
            files[f]["size"] for f in files if f.startswith("onnx/") and name_of(f) == name
        )


def name_of(file: str) -> str:
    return "int8" if "_quantized" in file else "int4" if "_q4" in file else "fp32"


def test_tied_embedding_is_stored_once_and_read_by_both_graphs(quantized, tiny_export_dir):
    """embed_tokens' table and lm_head are one 8-bit table in one file, read by both graphs."""
    manifest = read_manifest(quantized)
    for variant, suffix in (("int8", "_quantized"), ("int4", "_q4")):
        data = f"onnx/embed_tokens{suffix}.onnx.data"
        entry = manifest["variants"][variant]
        assert entry["embed_tokens"]["data"] == [data]
        assert entry["decoder_model_merged"]["data"][0] == data
        embed = onnx.load(str(quantized / entry["embed_tokens"]["file"]), load_external_data=False)
        decoder = onnx.load(str(quantized / entry["decoder_model_merged"]["file"]), load_external_data=False)
        assert [n.op_type for n in embed.graph.node][0] == "GatherBlockQuantized"
        external = {
            graph_name: sorted(
                (t.dims[0], dict((e.key, e.value) for e in t.external_data)["offset"])
                for g in iter_graphs(model.graph)
                for t in g.initializer
                if t.data_location == TensorProto.EXTERNAL
                and dict((e.key, e.value) for e in t.external_data)["location"] == Path(data).name
            )
            for graph_name, model in (("embed", embed), ("decoder", decoder))
        }
        vocab, width = manifest["model"]["vocab_size"], manifest["model"]["d_model"]
        scales_at = -(-vocab * width // 4096) * 4096  # codes first, scales on the next page
        assert external["embed"] == external["decoder"] == [(vocab, "0"), (vocab, str(scales_at))]
        assert (quantized / data).stat().st_size == scales_at + 4 * vocab  # d_model 64: one block per row
        assert float_bytes(embed) == 4 * vocab  # the block scales only: no float table left

    # The runtime's lookups through the shared table equal the fp32 table within 8-bit error.
    import onnxruntime as ort

    ids = np.array([[0, 2, 5, 50000, 51000]], np.int64)
    fp32 = ort.InferenceSession(str(tiny_export_dir / "onnx" / "embed_tokens.onnx"))
    int8 = ort.InferenceSession(str(quantized / "onnx" / "embed_tokens_quantized.onnx"))
    expected, got = fp32.run(None, {"input_ids": ids})[0], int8.run(None, {"input_ids": ids})[0]
    step = np.abs(expected).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(got - expected) <= step) and not np.array_equal(got, expected)


def test_untied_lm_head_keeps_its_own_table(tiny_export_dir):
    from flonnx.quantize.quantizer import tie_embedding

    decoder = quantize_component(
        onnx.load(str(tiny_export_dir / "onnx" / "decoder_model_merged.onnx")),
        get_recipe("int8").component("decoder_model_merged"),
        vocab := read_manifest(tiny_export_dir)["model"]["vocab_size"],
    )
    embed = onnx.load(str(tiny_export_dir / "onnx" / "embed_tokens.onnx"))
    table = embed.graph.initializer[0]
    changed = numpy_helper.to_array(table).copy()
    changed[7, 3] += 0.5  # one weight differs: not the same table
    table.CopyFrom(numpy_helper.from_array(changed, table.name))
    before = embed.SerializeToString()
    assert tie_embedding(embed, decoder, vocab, "x.data") is None
    assert embed.SerializeToString() == before


def test_requantizing_without_the_tie_removes_the_shared_file(quantized, tmp_path):
    folder = _copy(quantized, tmp_path)
    _run(folder, "int4", keep={"embed_tokens": "fp32"})
    manifest = _assert_consistent(folder)
    assert "onnx/embed_tokens_q4.onnx.data" not in manifest["files"]
    assert not (folder / "onnx" / "embed_tokens_q4.onnx.data").exists()
    assert manifest["variants"]["int4"]["decoder_model_merged"]["data"] == [
        "onnx/decoder_model_merged_q4.onnx.data"
    ]
    assert (folder / "onnx" / "embed_tokens_quantized.onnx.data").exists()  # int8's own stays
    assert Florence2.load(folder, variant="int4", threads=1).run(_image(), "<CAPTION>", max_new_tokens=3)


def test_second_run_rewrites_nothing(quantized):
    before = read_manifest(quantized)
    files = {f: (quantized / f).stat().st_mtime_ns for f in before["files"]}
    result = _run(quantized, "int8")
    after = _assert_consistent(quantized)
    assert result.written == []
    assert after["variants"] == before["variants"] and after["files"] == before["files"]
    assert {f: (quantized / f).stat().st_mtime_ns for f in after["files"]} == files


def test_override_keeps_a_component_fp32_under_its_own_variant_name(quantized):
    result = _run(
        quantized, "int8", keep={"vision_encoder": "fp32", "embed_tokens": "fp32"}, variant="int8-vf"
    )
    manifest = _assert_consistent(quantized)
    entry = manifest["variants"]["int8-vf"]
    assert entry["vision_encoder"] == {"file": "onnx/vision_encoder.onnx", "dtype": "fp32"}
    assert entry["decoder_model_merged"]["file"] == "onnx/decoder_model_merged_int8-vf.onnx"
    assert manifest["quantization"]["int8-vf"]["recipe"]["overrides"] == {
        "vision_encoder": "fp32",
        "embed_tokens": "fp32",
    }
    vision = next(c for c in result.report.components if c.component == "vision_encoder")
    assert vision.max_abs_error == 0 and vision.size == vision.fp32_size
    model = Florence2.load(quantized, variant="int8-vf", threads=1)
    assert model.run(_image(), "<OD>", max_new_tokens=4, num_beams=1)


def test_interrupted_run_leaves_fp32_and_manifest_consistent(quantized, tmp_path, monkeypatch):
    folder = _copy(quantized, tmp_path)
    fp32 = _fp32_records(folder)
    # A different encoder recipe, so the int8 variant's encoder file really changes.
    recipe = get_recipe("int8")
    components = dict(recipe.components)
    components["encoder_model"] = ComponentRecipe("int8", matmul_bits=8, per_channel=False)
    changed = Recipe(recipe.name, recipe.suffix, components)
    import flonnx.quantize.stage as stage

    calls = []
    real_replace = stage.os.replace

    def interrupted(source, target):
        if not str(target).endswith(".onnx"):  # the manifest's own atomic writes go through
            return real_replace(source, target)
        calls.append(target)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage.os, "replace", interrupted)
    keep = {"vision_encoder": "fp32", "decoder_model_merged": "fp32"}
    with pytest.raises(KeyboardInterrupt):
        _run(folder, changed, keep=keep)
    monkeypatch.setattr(stage.os, "replace", real_replace)
    assert calls, "the run did not reach the renames"
    manifest = _assert_consistent(folder)
    assert _fp32_records(folder) == fp32
    assert "int8" not in manifest["variants"]  # forgotten before its files were replaced
    assert "int4" in manifest["variants"]
    # and the next run completes
    _run(folder, changed, keep=keep)
    assert (
        _assert_consistent(folder)["variants"]["int8"]["encoder_model"]["file"]
        == "onnx/encoder_model_quantized.onnx"
    )


def test_report_flags_a_broken_variant(quantized, tmp_path):
    """Zero the int8 decoder's weights: the report must fail it."""
    folder = _copy(quantized, tmp_path)
    path = folder / "onnx" / "decoder_model_merged_quantized.onnx"
    model = onnx.load(str(path))
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if len(tensor.dims) >= 2:  # weights, their scales, tables
                array = numpy_helper.to_array(tensor)
                tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(array), tensor.name))
    onnx.save(model, str(path))
    manifest = read_manifest(folder)
    manifest["files"]["onnx/decoder_model_merged_quantized.onnx"] = file_record(
        folder, "onnx/decoder_model_merged_quantized.onnx"
    )
    write_json_atomic(folder / "flonnx.json", manifest)
    report = measure(folder, "int8", [("image", _image())], FAST)
    assert not report.passed
    messages = [flag.message for flag in report.flags if flag.kind == "accuracy"]
    assert any("decoder_model_merged" in m for m in messages)
    assert any("token agreement" in m for m in messages)
    assert "FAILED" in report.table()


# -- failures -----------------------------------------------------------------------------------------


def test_folder_without_fp32_export_is_refused(tiny_export_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="not a model folder: no flonnx.json .* and no onnx/"):
        _run(tmp_path)
    folder = _copy(tiny_export_dir, tmp_path)
    manifest = read_manifest(folder)
    del manifest["variants"]["fp32"]
    write_json_atomic(folder / "flonnx.json", manifest)
    with pytest.raises(ModelFolderError, match="no fp32 export"):
        _run(folder)


def test_corrupt_onnx_is_refused_and_nothing_is_written(tiny_export_dir, tmp_path):
    folder = _copy(tiny_export_dir, tmp_path)
    path = folder / "onnx" / "encoder_model.onnx"
    path.write_bytes(b"not an onnx model" * 100)
    with pytest.raises(ModelFolderError, match="encoder_model.onnx has 1700 bytes"):
        _run(folder)
    manifest = read_manifest(folder)
    manifest["files"]["onnx/encoder_model.onnx"] = file_record(folder, "onnx/encoder_model.onnx")
    write_json_atomic(folder / "flonnx.json", manifest)
    with pytest.raises(ModelFolderError, match="not a valid ONNX model"):
        _run(folder, keep={"vision_encoder": "fp32", "decoder_model_merged": "fp32"})
    assert set(_assert_consistent(folder)["variants"]) == {"fp32"}
    assert not list((folder / "onnx").glob("*_quantized.onnx"))


def test_variant_that_does_not_load_is_refused(tiny_export_dir, tmp_path, monkeypatch):
    import flonnx.quantize.stage as stage

    def broken(model, recipe, vocab_size):
        node = helper.make_node("NoSuchOp", ["input_ids"], ["inputs_embeds"], domain="flonnx.test")
        graph = helper.make_graph(
            [node],
            "broken",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, None)],
            [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, None)],
        )
        result = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("flonnx.test", 1)]
        )
        result.ir_version = 8
        return result

    monkeypatch.setattr(stage, "quantize_component", broken)
    folder = _copy(tiny_export_dir, tmp_path)
    keep = {"vision_encoder": "fp32", "encoder_model": "fp32", "decoder_model_merged": "fp32"}
    with pytest.raises(QuantizeError, match="int8 embed_tokens does not load"):
        _run(folder, keep=keep)
    assert set(_assert_consistent(folder)["variants"]) == {"fp32"}
    assert not list((folder / "onnx").glob("embed_tokens_*"))


def test_target_file_of_another_variant_is_refused(quantized):
    with pytest.raises(InputError, match="belongs to variant 'int8'"):
        _run(quantized, "int4", variant="quantized")


# -- the command line -----------------------------------------------------------------------------------


def test_cli_prints_the_report_and_the_runtime_runs_the_variant(quantized, tmp_path, capsys):
    image = tmp_path / "image.png"
    _image().save(image)
    code = cli.main(
        [
            "quantize",
            str(quantized),
            "--recipe",
            "int8",
            "--images",
            str(image),
            "--max-new-tokens",
            "4",
            "--min-agreement",
            "0",
            "--min-cosine",
            "0.9",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        "decoder_model_merged" in out and "bundle" in out and "decode_step" in out and "report: passed" in out
    )
    code = cli.main(
        ["run", str(quantized), str(image), "--task", "<OD>", "--variant", "int8", "--max-new-tokens", "4"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and "<OD>" in json.loads(lines[-1])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--recipe", "int3"], "unknown recipe 'int3', expected one of: int8, int4"),
        (["--recipe", "int8", "--keep", "decoder=fp32"], "unknown component 'decoder'"),
        (["--recipe", "int8", "--keep", "embed_tokens=int4"], "embed_tokens has no int4 form"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(quantized, capsys, args, fragment):
    assert cli.main(["quantize", str(quantized), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_cli_missing_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "nowhere"), "--recipe", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
