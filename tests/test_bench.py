"""`flonnx bench` on the tiny model: the peers, the floors, the report and the targets table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flonnx.runtime.errors import ExportError, InputError

NODE = shutil.which("node")


def _cache(tmp_path, tiny_loc_model_dir, tiny_export_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-checkpoint").symlink_to(tiny_loc_model_dir)
    (cache / "tiny-onnx").symlink_to(tiny_export_dir)
    return cache


def test_bench_smoke(tiny_loc_model_dir, tiny_export_dir, tmp_path):
    """One run with every peer, on one thread: every section of the report is filled in."""
    from flonnx.export.bench import BenchOptions, run_bench
    from flonnx.export.bench_floors import cache_bytes
    from flonnx.export.bench_report import markdown, write_report
    from flonnx.export.exporter import Progress
    from flonnx.runtime.decoding import CacheLayout

    cache = _cache(tmp_path, tiny_loc_model_dir, tiny_export_dir)
    options = BenchOptions(
        size="tiny",
        repeats=1,
        threads=1,
        cache=cache,
        out=tmp_path / "out",
        profiles=("caption",),
        variants=("fp32",),
        server=False,
        beam=False,
        bf16="on",
    )
    report = run_bench(options, Progress(quiet=True))

    caption = report["profiles"]["caption"]
    assert caption["parity"]["fp32"]["equal"] is True
    row = caption["flonnx"]["fp32"]
    assert row["speedup_vs_torch"] > 0 and row["tokens_per_s"] > 0
    assert set(row["stages"]) == {"preprocess", "vision", "encoder", "first_step", "step", "postprocess"}
    assert all(value >= 0 for value in row["stages"].values())
    bf16 = caption["peers"]["pytorch_bf16"]
    assert bf16["label"] == "PyTorch bf16" and bf16["end_to_end"]["median"] > 0
    assert 0 <= bf16["parity"]["agreement"] <= 1
    if NODE is None:
        assert report["skipped"]["transformers.js"] == "node is not installed"
        assert not any(key.startswith("tjs_") for key in caption["peers"])
    else:
        assert "transformers.js" not in report["skipped"], report["skipped"]
        assert set(caption["peers"]) == {"pytorch_bf16", "tjs_community_q8", "tjs_fp32"}
        # same graphs, same pixels: transformers.js's greedy tokens are PyTorch's
        assert caption["peers"]["tjs_fp32"]["parity"]["equal"] is True
        assert caption["peers"]["tjs_community_q8"]["end_to_end"]["median"] > 0
        assert (cache / "tiny-community" / "onnx" / "vision_encoder_quantized.onnx").is_file()
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    runtime = report["runtime"]["fp32"]
    assert runtime["heavy_imports"] == [] and runtime["peak_rss_bytes"] > runtime["bundle_bytes"] > 0
    assert runtime["peak_rss_bytes"] > runtime["runtime_import_rss_bytes"] > 10e6

    floors = report["floors"]
    assert floors["sgemm_gflops"] > 1 and floors["int8_gemm_gops"] > 1 and floors["memory_gb_s"] > 0.5
    assert len(floors["runs"]) == 2  # before and after the timings: the best of each is the floor
    assert floors["sgemm_gflops"] == max(rates["sgemm_gflops"] for rates in floors["runs"])
    vision = floors["vision"]["fp32"]
    assert vision["integer_gflop"] == 0 and vision["float_gflop"] > 0.01
    assert vision["floor_s"] == pytest.approx(vision["float_gflop"] / floors["sgemm_gflops"])
    assert vision["over_floor"] == pytest.approx(row["stages"]["vision"] / vision["floor_s"])
    step = floors["decode_step"]["fp32"]
    assert step["weight_bytes"] > 1e6
    # the cross-attention covers the image tokens and the prompt; the cache only adds to the floor
    model = json.loads((tiny_export_dir / "flonnx.json").read_text())["model"]
    assert caption["encoder_tokens"] > model["num_image_tokens"]
    layout = CacheLayout(model["decoder_layers"], model["decoder_heads"], model["head_dim"])
    assert step["cache_bytes"] == cache_bytes(layout, caption["encoder_tokens"], caption["new_tokens"]) > 0
    assert step["floor_with_cache_s"] > step["floor_s"] > 0

    by_target = {row["target"]: row for row in report["targets"]}
    assert by_target["caption: flonnx fp32 vs PyTorch fp32"]["measured"] == pytest.approx(
        row["speedup_vs_torch"]
    )
    assert by_target["caption: flonnx int8 vs PyTorch fp32"]["met"] is None  # no int8 in this run
    assert by_target["detection: flonnx fp32 vs PyTorch fp32"]["why"] == "profile detection not run"
    assert by_target["vision encoder fp32 / its sgemm floor"]["measured"] == vision["over_floor"]

    json_path, md_path = write_report(report, options.out)
    text = md_path.read_text()
    assert json.loads(json_path.read_text())["targets"] == report["targets"]
    assert markdown(report) == text
    for fragment in (
        "| flonnx fp32 |",
        "| PyTorch bf16 |",
        "### Targets (issue 16)",
        "### Floors",
        "| fp32 | 0.0 |",
    ):
        assert fragment in text
    assert ("| transformers.js, community q8 |" in text) == (NODE is not None)


def _report() -> dict:
    """A handmade report: PyTorch fp32 4 s, bf16 2 s, transformers.js q8 3 s; flonnx fp32 2.8 s
    (1.43x) and int8 1 s (4x PyTorch, 2x bf16, 3x transformers.js) on caption; no detection."""

    def timed(seconds):
        return {"median": seconds, "min": seconds, "max": seconds, "runs": [seconds]}

    stages = {
        "preprocess": 0.01,
        "vision": 0.6,
        "encoder": 0.1,
        "first_step": 0.02,
        "step": 0.005,
        "postprocess": 0,
    }
    peers = {
        "pytorch_bf16": {"label": "PyTorch bf16", "end_to_end": timed(2.0), "speedup_vs_torch": 2.0},
        "tjs_community_q8": {"label": "transformers.js, community q8", "end_to_end": timed(3.0001)},
    }
    for peer in peers.values():
        peer.update(speedup_vs_torch=4 / peer["end_to_end"]["median"], tokens_per_s=5.0)
        peer["parity"] = {"equal": False, "agreement": 0.5}
    return {
        "size": "base",
        "repeats": 1,
        "machine": {"cpu": "Test CPU", "avx512_vnni": True, "avx512_bf16": False, "amx": False, "cpus": 2}
        | {"platform": "Linux", "python": "3.12", "threads": 2},
        "skipped": {"transformers.js": "node is not installed"},
        "profiles": {
            "caption": {
                "task": "<CAPTION>",
                "new_tokens": 20,
                "encoder_tokens": 590,
                "parity": {
                    "fp32": {"equal": True, "agreement": 1.0},
                    "int8": {"equal": False, "agreement": 0.9},
                },
                "torch": timed(4.0),
                "peers": peers,
                "flonnx": {
                    "fp32": {
                        "end_to_end": timed(4 / 1.4),
                        "speedup_vs_torch": 1.4,
                        "tokens_per_s": 7,
                        "stages": stages,
                    },
                    "int8": {
                        "end_to_end": timed(1.0),
                        "speedup_vs_torch": 4.0,
                        "tokens_per_s": 20,
                        "stages": stages,
                    },
                },
            }
        },
        "runtime": {
            "int8": {"bundle_bytes": 257e6, "peak_rss_bytes": 601e6, "rss_over_bundle": 2.3}
            | {"runtime_import_rss_bytes": 59e6, "cold_start_s": 1.0}
        },
        "floors": {
            "sgemm_gflops": 200.0,
            "int8_gemm_gops": 800.0,
            "memory_gb_s": 20.0,
            "vision": {
                "fp32": {"integer_gflop": 0, "float_gflop": 380, "floor_s": 1.9, "measured_s": 2.6}
                | {"over_floor": 2.6 / 1.9},
                "int8": {"integer_gflop": 349, "float_gflop": 32, "floor_s": 0.6, "measured_s": 0.6}
                | {"over_floor": 1.0},
            },
            "decode_step": {
                "int8": {"weight_bytes": 91e6, "floor_s": 0.0045, "measured_s": 0.006, "over_floor": 1.33}
                | {
                    "cache_bytes": 24e6,
                    "floor_with_cache_s": 0.0058,
                    "over_floor_with_cache": 0.006 / 0.0058,
                },
            },
        },
        "beam": {"int8": {"beams": 3, "greedy": timed(2.0), "beam": timed(2.6), "cost": 1.3}},
        "server": {"int8": {"1": {"images_per_s": 0.5}, "4": {"images_per_s": 1.0}}},
    }


def test_targets_table_says_met_missed_and_not_measured():
    from flonnx.export.bench_report import markdown, targets

    rows = {row["target"]: row for row in targets(_report())}
    assert len(rows) == 13
    expected = {
        "caption: flonnx fp32 vs PyTorch fp32": (1.4, True),  # exactly the goal: met
        "caption: flonnx int8 vs PyTorch fp32": (4.0, True),
        "caption: flonnx int8 vs PyTorch bf16": (2.0, True),
        "caption: flonnx int8 vs transformers.js on community q8": (3.0001, True),
        "vision encoder int8 / its int8 GEMM floor": (1.0, True),
        "vision encoder fp32 / its sgemm floor": (2.6 / 1.9, False),
        "int8 decode step / its floor with the K/V it reads": (0.006 / 0.0058, True),
        "int8 peak RSS (fresh process: load + two captions)": (601, False),  # 1 MB over
        "int8 cold start": (1.0, True),
    }
    for name, (measured, met) in expected.items():
        assert rows[name]["measured"] == pytest.approx(measured), name
        assert rows[name]["met"] is met, name
    for name in ("detection: flonnx fp32 vs PyTorch fp32", "detection: flonnx int8 vs PyTorch bf16"):
        assert rows[name]["met"] is None and rows[name]["why"] == "profile detection not run"

    report = _report()
    del report["profiles"]["caption"]["peers"]["tjs_community_q8"]
    report["profiles"]["caption"]["flonnx"]["int8"]["end_to_end"]["median"] = 1.01  # 3.96x
    rows = {row["target"]: row for row in targets(report)}
    assert rows["caption: flonnx int8 vs PyTorch fp32"]["met"] is False
    assert rows["caption: flonnx int8 vs transformers.js on community q8"]["met"] is None
    assert rows["caption: flonnx int8 vs transformers.js on community q8"]["why"] == "node is not installed"

    text = markdown(report)
    assert "| caption: flonnx int8 vs PyTorch fp32 | 3.96x | >= 4.00x | **missed** |" in text
    assert "| int8 peak RSS (fresh process: load + two captions) | 601 MB | <= 600 MB | **missed** |" in text
    assert "| int8 cold start | 1.00 s | <= 1.00 s | met |" in text
    assert "| - | >= 3.00x | not measured (node is not installed) |" in text
    assert "4 of 8 measured targets met." in text  # bf16 is now 1.98x too


def test_markdown_has_every_section():
    from flonnx.export.bench_report import markdown

    text = markdown(_report())
    assert "Machine: Test CPU, 2 CPUs (avx512_vnni yes, avx512_bf16 no, AMX no)" in text
    assert "Not timed: transformers.js (node is not installed)." in text
    assert "| PyTorch fp32 | 4.00 | 1.00x | 5.0 | (reference) |" in text
    assert "| PyTorch bf16 | 2.00 | 2.00x | 5.0 | 50% agree | | | | |" in text
    assert "| flonnx int8 | 1.00 | 4.00x | 20.0 | 90% agree | 0.60 | 0.10 | 20.0 | 5.0 |" in text
    assert (
        text.index("| PyTorch bf16 |")
        < text.index("| transformers.js, community q8 |")
        < text.index("| flonnx fp32 |")
    )
    assert "int8 GEMM (the same MatMul, dynamic int8) 800 GOP/s (4.0x sgemm)" in text
    assert "| int8 | 349.0 | 32.0 | 0.60 | 0.60 | 1.00x |" in text
    assert "| int8 | 91 | 4.5 | 24 | 5.8 | 6.0 | 1.33x | 1.03x |" in text
    assert "| int8 (num_beams=3) | 2.00 | 2.60 | 1.30x |" in text
    assert "| int8 | 0.50 | 1.00 |" in text
    assert "| int8 | 257 | 601 | 2.30 | 59 | 1.00 |" in text


def test_graph_flops_split_integer_and_float_products(tiny_loc_model_dir, tiny_export_dir, tmp_path):
    """Counted from the graph's shapes: the fp32 vision encoder is all float and agrees with
    PyTorch's own count; quantizing its weight MatMuls moves their FLOPs to the integer side."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from PIL import Image

    from flonnx.export.bench_floors import graph_flops, vision_floor
    from flonnx.export.bench_peers import TorchSide
    from flonnx.runtime.manifest import read_manifest

    graph = tiny_export_dir / read_manifest(tiny_export_dir)["variants"]["fp32"]["vision_encoder"]["file"]
    size = json.loads((tiny_export_dir / "preprocessor_config.json").read_text())["size"]
    feeds = {"pixel_values": np.zeros((1, 3, size["height"], size["width"]), np.float32)}
    fp32 = graph_flops(graph, feeds)
    assert fp32["integer"] == 0 and set(fp32["by_op"]) == {"Conv", "MatMul"}
    image = Image.new("RGB", (size["width"], size["height"]))
    torch_count = TorchSide(tiny_loc_model_dir, threads=1).vision_flops(image)
    assert fp32["by_op"]["Conv"] == torch_count["convolution"] > 0
    # PyTorch does not count the attention inside scaled_dot_product_attention; the graph does
    assert fp32["float"] > sum(torch_count.values())

    quantized = tmp_path / "vision_int8.onnx"
    quantize_dynamic(
        onnx.load(str(graph)),
        quantized,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    int8 = graph_flops(quantized, feeds)
    # the quantized products are the weight MatMuls: PyTorch's Linear layers (addmm, mm)
    assert int8["integer"] == pytest.approx(torch_count["addmm"] + torch_count.get("mm", 0), rel=1e-9)
    assert int8["by_op"]["Conv"] == fp32["by_op"]["Conv"]
    assert int8["integer"] + int8["float"] == pytest.approx(fp32["float"])
    assert vision_floor(int8, sgemm=100, int8_gemm=400) == pytest.approx(
        int8["integer"] / 1e9 / 400 + int8["float"] / 1e9 / 100
    )


def test_node_flops_count_products_and_convolutions():
    from flonnx.export.bench_floors import node_flops

    assert node_flops("MatMul", [[2, 3, 4], [4, 5]], [[2, 3, 5]]) == 2 * 2 * 3 * 5 * 4
    assert node_flops("MatMulInteger", [[3, 4], [4, 5], [], []], [[3, 5]]) == 2 * 3 * 5 * 4
    # depthwise 3x3 over 8 channels: one input channel per output
    assert node_flops("Conv", [[1, 8, 6, 6], [8, 1, 3, 3], [8]], [[1, 8, 6, 6]]) == 2 * 8 * 36 * 9
    assert node_flops("QLinearConv", [[1, 4, 6, 6], [], [], [2, 4, 1, 1]], [[1, 2, 6, 6]]) == 2 * 2 * 36 * 4
    assert node_flops("Softmax", [[2, 3]], [[2, 3]]) == 0
    # attention: Q K^T over 7 keys (2 x 5 x 7 x 8 MACs) and the weighted sum of V (2 x 5 x 7 x 6)
    assert (
        node_flops("MultiHeadAttention", [[2, 5, 8], [2, 7, 8], [2, 7, 6]], [[2, 5, 6]]) == 2 * 2 * 5 * 7 * 14
    )
    assert (
        node_flops("MultiHeadAttention", [[2, 5, 8], [2, 4, 7, 2], [2, 4, 7, 2]], [[2, 5, 8]]) == 2 * 70 * 16
    )
    assert node_flops("MultiHeadAttention", [[2, 5, 4, 3, 2]], [[2, 5, 8]]) == 2 * 2 * 5 * 5 * 16


def test_graph_flops_count_fused_attention(tmp_path):
    """onnxruntime's MultiHeadAttention (the int8 recipe may fuse window attention into it) is
    counted from the shapes the profiler records for it, as float work."""
    from onnx import TensorProto, helper

    from flonnx.export.bench_floors import graph_flops

    shape = {"q": [2, 5, 8], "k": [2, 7, 8], "v": [2, 7, 8]}
    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", list(shape), ["out"], domain="com.microsoft", num_heads=2)],
        "attention",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in shape.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp_path / "attention.onnx"
    path.write_bytes(model.SerializeToString())
    feeds = {name: np.ones(dims, np.float32) for name, dims in shape.items()}
    assert graph_flops(path, feeds) == {
        "integer": 0,
        "float": 2 * 2 * 5 * 7 * 16,
        "by_op": {"MultiHeadAttention": 2 * 2 * 5 * 7 * 16},
    }


def test_floors_are_positive():
    from flonnx.export.bench_floors import int8_gemm_gops, memory_bandwidth, sgemm_gflops

    assert sgemm_gflops(1, size=256, repeats=2) > 0.1
    assert int8_gemm_gops(1, size=256, repeats=2) > 0.1
    assert memory_bandwidth(megabytes=16, repeats=2) > 0.1


def test_cpu_features_and_the_bf16_choice():
    from flonnx.export.bench_floors import cpu_features
    from flonnx.export.bench_peers import bf16_reason

    xeon = "model name\t: Intel Xeon\nflags\t\t: sse avx512_vnni avx512_bf16 amx_tile amx_bf16\n"
    epyc = "model name\t: AMD EPYC\nflags\t\t: sse avx512_vnni avx512_bf16\n"
    old = "model name\t: Old\nflags\t\t: sse avx2\n"
    assert cpu_features(xeon) == {
        "model": "Intel Xeon",
        "flags_known": True,
        "avx512_vnni": True,
        "avx512_bf16": True,
        "amx": True,
        "amx_bf16": True,
    }
    assert cpu_features(epyc)["amx"] is False and cpu_features(epyc)["avx512_bf16"] is True
    assert cpu_features("")["model"] == "unknown CPU"
    assert bf16_reason("auto", cpu_features(epyc)) == (True, "the CPU has avx512_bf16")
    assert bf16_reason("auto", cpu_features(old))[0] is False
    assert bf16_reason("on", cpu_features(old))[0] is True
    assert bf16_reason("off", cpu_features(xeon)) == (False, "--bf16 off")


def test_bf16_peer_runs_in_bfloat16(tiny_loc_model_dir):
    import torch
    from PIL import Image

    from flonnx.export.bench_peers import TorchSide

    side = TorchSide(tiny_loc_model_dir, threads=1, bfloat16=True)
    assert next(side.model.parameters()).dtype == torch.bfloat16
    ids, seconds = side.run(Image.new("RGB", (64, 48), "white"), "<OD>", 7)
    assert len(ids) == 1 + 7 and seconds > 0  # decoder start + the forced length


def test_transformers_js_peer_answers_like_pytorch(tiny_loc_model_dir, tiny_export_dir, tmp_path):
    if NODE is None:
        pytest.skip("node is not installed: transformers.js cannot run")
    from PIL import Image

    from flonnx.export.bench_peers import TorchSide, TransformersJsSide, transformers_js_missing

    assert transformers_js_missing() is None, "run `make setup`"
    size = json.loads((tiny_export_dir / "preprocessor_config.json").read_text())["size"]
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (size["height"], size["width"], 3), np.uint8)
    )
    image.save(tmp_path / "image.png")
    reference, _ = TorchSide(tiny_loc_model_dir, threads=1).run(image, "<OD>", 12)
    side = TransformersJsSide(tiny_export_dir, "fp32", threads=1)
    try:
        assert side.load_s > 0
        ids, seconds = side.run(tmp_path / "image.png", "<OD>", 12)
        assert ids == reference and seconds > 0
        with pytest.raises(ExportError, match="failed: .*missing.png"):
            side.run(tmp_path / "missing.png", "<OD>", 12)
        assert side.run(tmp_path / "image.png", "<OD>", 12)[0] == reference  # still serving
    finally:
        side.close()
    assert side.process.returncode == 0


def test_community_folder_is_made_once_and_remade_when_the_export_changes(tiny_export_dir, tmp_path):
    from flonnx.export.bench_peers import STAMP, community_folder, js_dtype
    from flonnx.runtime.manifest import read_manifest

    lines = []
    out = community_folder(tiny_export_dir, tmp_path / "community", lines.append)
    assert (out / "onnx" / "decoder_model_merged_quantized.onnx").is_file() and lines
    made = (out / "onnx" / "vision_encoder_quantized.onnx").stat().st_mtime_ns
    lines.clear()
    assert community_folder(tiny_export_dir, out, lines.append) == out and not lines
    assert (out / "onnx" / "vision_encoder_quantized.onnx").stat().st_mtime_ns == made
    stamp = json.loads((out / STAMP).read_text())
    (out / STAMP).write_text(json.dumps(dict.fromkeys(stamp, "0" * 64)))
    community_folder(tiny_export_dir, out, lines.append)
    assert lines and json.loads((out / STAMP).read_text()) == stamp
    assert js_dtype(read_manifest(tiny_export_dir), "fp32") == "fp32"
    assert (
        js_dtype(
            {"variants": {"int8": {"vision_encoder": {"file": "onnx/vision_encoder_quantized.onnx"}}}}, "int8"
        )
        == "q8"
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": "huge"}, "'huge', expected one of: tiny, base, large"),
        ({"repeats": 0}, "repeats must be a positive integer, got 0"),
        ({"threads": 0}, "threads must be a positive integer, got 0"),
        ({"threads": "2"}, "threads must be a positive integer, got '2'"),
        ({"profiles": ("ocr",)}, "unknown profile ocr, expected: caption, detection"),
        ({"bf16": "maybe"}, "unknown --bf16 value 'maybe', expected one of: auto, on, off"),
    ],
)
def test_bench_options_are_validated(kwargs, fragment):
    from flonnx.export.bench import BenchOptions

    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        BenchOptions(**kwargs)


def test_cache_bytes_counts_cross_and_mean_self_attention_lengths():
    from flonnx.export.bench_floors import cache_bytes
    from flonnx.runtime.decoding import CacheLayout

    # 2 layers x K and V x (10 encoder tokens + mean self length (2 + 20) / 2) x 4 heads x 16 x 4 bytes
    assert cache_bytes(CacheLayout(2, 4, 16), 10, 20) == 2 * 2 * 21 * 4 * 16 * 4
    assert cache_bytes(CacheLayout(2, 4, 16), 10, 1) == 2 * 2 * 10 * 4 * 16 * 4


@pytest.mark.parametrize("listed", [True, False])
def test_a_variant_whose_quantize_report_failed_is_timed_and_a_failed_quantize_is_an_error(
    tiny_loc_model_dir, tiny_export_dir, tmp_path, monkeypatch, listed
):
    import subprocess

    import flonnx.export.bench as bench
    from flonnx.export.bench import BenchOptions, prepare
    from flonnx.runtime.manifest import read_manifest

    cache = _cache(tmp_path, tiny_loc_model_dir, tiny_export_dir)
    calls = []

    def quantize(command, **kwargs):  # exit 1: the report flagged accuracy, or it failed early
        calls.append(command)
        return subprocess.CompletedProcess(command, 1)

    def manifest(folder):
        found = read_manifest(folder)
        if calls and listed:
            found["variants"]["int8"] = found["variants"]["fp32"]
        return found

    monkeypatch.setattr(bench.subprocess, "run", quantize)
    monkeypatch.setattr(bench, "read_manifest", manifest)
    lines = []
    options = BenchOptions(size="tiny", cache=cache, variants=("fp32", "int8"))
    if listed:
        assert prepare(options, lines.append) == (cache / "tiny-checkpoint", cache / "tiny-onnx")
        assert "int8: its quantize report flagged accuracy (above); timed all the same" in lines
    else:
        with pytest.raises(ExportError, match=r"--recipe int8 failed \(exit 1\)"):
            prepare(options, lines.append)
    assert [command[1:] for command in calls] == [["quantize", str(cache / "tiny-onnx"), "--recipe", "int8"]]
