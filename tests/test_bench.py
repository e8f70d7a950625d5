"""A smoke run of `flonnx bench` on the tiny model: every section of the report is filled in."""

from __future__ import annotations

import pytest

from flonnx.runtime.errors import InputError


def test_bench_smoke(tiny_loc_model_dir, tiny_export_dir, tmp_path):
    from flonnx.export.bench import BenchOptions, markdown, run_bench, write_report
    from flonnx.export.exporter import Progress

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
    floors = report["floors"]
    assert floors["matmul_gflops"] > 1 and floors["memory_gb_s"] > 0.5 and floors["vision_gflop"] > 0.1
    assert floors["decode_step"]["fp32"]["weight_bytes"] > 1e6
    json_path, md_path = write_report(report, options.out)
    assert json_path.is_file() and "| caption | flonnx fp32 |" in md_path.read_text()
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
