"""Shared fixtures. Model fixtures skip when the export extra (torch, transformers) is missing."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def verification_cache(tmp_path_factory: pytest.TempPathFactory):
    """Hashes the runtime has checked are remembered here, not in the user's ~/.cache."""
    import os

    old = os.environ.get("FLONNX_CACHE")
    os.environ["FLONNX_CACHE"] = str(tmp_path_factory.mktemp("flonnx_cache"))
    yield
    if old is None:
        del os.environ["FLONNX_CACHE"]
    else:
        os.environ["FLONNX_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native Florence-2 checkpoint folder with the `tiny` shape and seeded random weights."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from flonnx.export.testmodels import save_model

    return save_model("tiny", tmp_path_factory.mktemp("tiny_model"))


# Scaled <loc_N> rows make the random model write boxes and polygons, so every parser is exercised.
LOC_SCALE = 2.0


@pytest.fixture(scope="session")
def tiny_loc_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` checkpoint with location tokens made likely (see LOC_SCALE)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from flonnx.export.testmodels import save_model

    return save_model("tiny", tmp_path_factory.mktemp("tiny_loc_model"), seed=1, loc_scale=LOC_SCALE)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_loc_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`flonnx export` of the tiny checkpoint: the folder every runtime test loads."""
    from flonnx.export.exporter import Progress, export

    out = tmp_path_factory.mktemp("tiny_export") / "export"
    export(str(tiny_loc_model_dir), out, progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="session")
def synthetic_variants_160(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped synthetic model exported at 160 px, with flonnx's int8 and int4 variants beside
    fp32: the folder transformers.js (Node) and the web pack (a browser) are checked on."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnx")
    from flonnx.export.exporter import Progress, export
    from flonnx.quantize import ReportOptions, quantize
    from flonnx.quantize.calibration import CALIBRATION_TASKS
    from flonnx.quantize.stage import Progress as QuantizeProgress

    shipped = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"
    out = tmp_path_factory.mktemp("synthetic_160") / "export"
    export(str(shipped), out, image_size=160, progress=Progress(quiet=True))
    configs = {path.name: path.read_bytes() for path in out.glob("*.json") if path.name != "flonnx.json"}
    quick = ReportOptions(
        max_new_tokens=8, repeats=1, decode_repeats=1, threads=1, tasks=CALIBRATION_TASKS[:1]
    )
    for recipe in ("int8", "int4"):
        quantize(out, recipe, options=quick, progress=QuantizeProgress(quiet=True))
    # Quantizing adds graphs and manifest entries: the configs transformers.js reads stay as exported.
    assert {name: (out / name).read_bytes() for name in configs} == configs
    return out


@pytest.fixture(scope="session")
def reference_folder(tiny_model_dir: Path) -> Path:
    """The folder `reference` and `tokenizer` come from (the plain tiny checkpoint)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def reference(reference_folder: Path):
    """transformers' Florence2Processor with the real tokenizer and post_processor_config."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(reference_folder)


@pytest.fixture(scope="session")
def tokenizer(reference_folder: Path):
    """The checkpoint's tokenizer.json as the runtime loads it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(reference_folder / "tokenizer.json"))
