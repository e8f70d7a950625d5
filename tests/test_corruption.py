"""Robustness campaign, corrupted folders: truncated or bit-flipped graphs, weights, tokenizer and
configs, and a manifest that lies, each refused at load with an error that names the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flonnx.runtime.errors import FlonnxError, ModelFolderError
from flonnx.runtime.manifest import CONFIG_FILES
from flonnx.runtime.model import Florence2


def _files(folder: Path) -> list[str]:
    """The listed files the runtime reads (processor_config.json is for transformers only)."""
    listed = json.loads((folder / "flonnx.json").read_text())["files"]
    return sorted(name for name in listed if name.startswith("onnx/") or name in CONFIG_FILES)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x20  # for JSON files a letter's case, or a digit turned into a control character
    path.write_bytes(bytes(data))


@pytest.fixture
def copy(tiny_export_dir, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, target)
    return target


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "bit-flipped"])
def test_every_listed_file_damaged_is_named_at_load(tiny_export_dir, tmp_path, damage):
    for index, name in enumerate(_files(tiny_export_dir)):
        target = tmp_path / f"copy{index}"
        shutil.copytree(tiny_export_dir, target)
        damage(target / name)
        with pytest.raises(ModelFolderError) as caught:
            Florence2.load(target, threads=1)
        assert name.split("/")[-1] in str(caught.value), (name, str(caught.value))


@pytest.mark.parametrize(
    "name",
    ["config.json", "preprocessor_config.json", "generation_config.json", "tokenizer.json"],
)
def test_damaged_files_of_a_folder_without_manifest_are_named(copy, name):
    """No hashes to check: the file's own parse fails, and says which file."""
    (copy / "flonnx.json").unlink()
    (copy / name).write_text('{"truncated": ')
    with pytest.raises(ModelFolderError, match=name.replace(".", r"\.")):
        Florence2.load(copy, threads=1)


def test_truncated_graph_of_a_folder_without_manifest_is_named(copy):
    (copy / "flonnx.json").unlink()
    _truncate(copy / "onnx" / "encoder_model.onnx")
    with pytest.raises(ModelFolderError, match="onnxruntime cannot load .*encoder_model.onnx"):
        Florence2.load(copy, threads=1)


def _lie(folder: Path, change) -> None:
    manifest = json.loads((folder / "flonnx.json").read_text())
    change(manifest)
    (folder / "flonnx.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["model"].update(decoder_layers=3),
            "cache inputs for 2 decoder layers; the config says 3",
        ),
        (lambda m: m["model"].update(head_dim=7), "config implies 4 heads of 7"),
        (lambda m: m["model"].update(decoder_heads="four"), "decoder_heads must be a positive integer"),
        (
            lambda m: m["files"]["onnx/embed_tokens.onnx"].update(sha256="0" * 64),
            "embed_tokens.onnx does not match",
        ),
        (lambda m: m["files"]["onnx/embed_tokens.onnx"].update(size=1), "embed_tokens.onnx has"),
        (lambda m: m["variants"]["fp32"]["embed_tokens"].update(file="onnx/none.onnx"), "onnx/none.onnx"),
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m["variants"]["fp32"].pop("encoder_model"), "no file for encoder_model"),
    ],
    ids=["layers", "head_dim", "heads-type", "sha256", "size", "missing-file", "version", "no-component"],
)
def test_a_manifest_that_lies_is_caught(copy, change, message):
    _lie(copy, change)
    with pytest.raises(FlonnxError, match=message):
        Florence2.load(copy, threads=1)


def test_wrong_image_token_count_is_a_clear_error_at_run(copy):
    _lie(copy, lambda m: m["model"].update(num_image_tokens=7))
    model = Florence2.load(copy, threads=1)
    from PIL import Image

    with pytest.raises(FlonnxError, match="image features have 577 tokens; this export expects 7"):
        model.run(Image.new("RGB", (40, 30)), "<CAPTION>")
