"""A smoke run of `flonnx bench` on the tiny model: every section of the report is filled in."""

from __future__ import annotations

import json

import pytest

from flonnx.runtime.errors import InputError


def test_bench_smoke(tiny_loc_model_dir, tiny_export_dir, tmp_path):
    from flonnx.export.bench import BenchOptions, cache_bytes, markdown, run_bench, write_report
    from flonnx.export.exporter import Progress
    from flonnx.runtime.decoding import CacheLayout

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-checkpoint").symlink_to(tiny_loc_model_dir)
    (cache / "tiny-onnx").symlink_to(tiny_export_dir)
    options = BenchOptions(
        size="tiny",
        repeats=1,
        threads=2,
        cache=cache,
        out=tmp_path / "out",
        profiles=("caption",),
        variants=("fp32",),
        server=False,
    )
    report = run_bench(options, Progress(quiet=True))

    caption = report["profiles"]["caption"]
    assert caption["parity"]["fp32"]["equal"] is True
    row = caption["flonnx"]["fp32"]
    assert row["speedup_vs_torch"] > 0 and row["tokens_per_s"] > 0
    assert set(row["stages"]) == {"preprocess", "vision", "encoder", "first_step", "step", "postprocess"}
    assert all(value >= 0 for value in row["stages"].values())
    runtime = report["runtime"]["fp32"]
    assert runtime["heavy_imports"] == [] and runtime["peak_rss_bytes"] > runtime["bundle_bytes"] > 0
    assert runtime["peak_rss_bytes"] > runtime["runtime_import_rss_bytes"] > 10e6
    floors = report["floors"]
    assert floors["matmul_gflops"] > 1 and floors["memory_gb_s"] > 0.5 and floors["vision_gflop"] > 0.1
    step = floors["decode_step"]["fp32"]
    assert step["weight_bytes"] > 1e6
    # the cross-attention covers the image tokens and the prompt; the cache only adds to the floor
    model = json.loads((tiny_export_dir / "flonnx.json").read_text())["model"]
    assert caption["encoder_tokens"] > model["num_image_tokens"]
    layout = CacheLayout(model["decoder_layers"], model["decoder_heads"], model["head_dim"])
    assert step["cache_bytes"] == cache_bytes(layout, caption["encoder_tokens"], caption["new_tokens"]) > 0
    assert step["floor_with_cache_s"] > step["floor_s"] > 0
    json_path, md_path = write_report(report, options.out)
    assert json_path.is_file() and "| caption | flonnx fp32 |" in md_path.read_text()
    assert "MB of K/V cache a step also reads" in md_path.read_text()
    assert markdown(report) == md_path.read_text()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": "huge"}, "tiny, base, large"),
        ({"repeats": 0}, "repeats"),
        ({"profiles": ("ocr",)}, "caption"),
    ],
)
def test_bench_options_are_validated(kwargs, fragment):
    from flonnx.export.bench import BenchOptions

    with pytest.raises(InputError, match=fragment):
        BenchOptions(**kwargs)


def test_cache_bytes_counts_cross_and_mean_self_attention_lengths():
    from flonnx.export.bench import cache_bytes
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
    from flonnx.runtime.errors import ExportError
    from flonnx.runtime.manifest import read_manifest

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-checkpoint").symlink_to(tiny_loc_model_dir)
    (cache / "tiny-onnx").symlink_to(tiny_export_dir)
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
