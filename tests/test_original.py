"""Microsoft's original (remote-code) checkpoints: conversion without their code, then the export.

The original folders here are written from native test models by the inverse mapping
(`testmodels.save_original`); `../shared/florence2_reference` holds real configs and tokenizers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import LOC_SCALE
from PIL import Image
from tasks import TASKS

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flonnx.export import testmodels  # noqa: E402
from flonnx.export.exporter import Progress, export  # noqa: E402
from flonnx.export.original import load_original, native_config, native_name  # noqa: E402
from flonnx.runtime import cli  # noqa: E402
from flonnx.runtime.errors import ExportError  # noqa: E402
from flonnx.runtime.model import Florence2  # noqa: E402
from flonnx.runtime.vocabulary import FLORENCE_TOKENS, add_florence_tokens  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "florence2_reference"
ROWS = testmodels.ORIGINAL_VOCAB_ROWS
MAX_NEW_TOKENS = 40


def _reference_file(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real Florence-2 files live in ../shared outside the project")
    return path


def _image(seed: int, size=(400, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def native_model():
    """The tiny model with the weights an original checkpoint can hold (fp16, 51289 live rows)."""
    return testmodels.native_for_original(testmodels.build_model("tiny", seed=1, loc_scale=LOC_SCALE))


@pytest.fixture(scope="module")
def folders(native_model, tmp_path_factory):
    """(native checkpoint folder, original-format folder, flonnx export of the original)."""
    base = tmp_path_factory.mktemp("original")
    native = base / "native"
    native_model.save_pretrained(native)
    testmodels.build_processor().save_pretrained(native)
    original = testmodels.save_original(native_model, base / "original")
    out = base / "export"
    assert cli.main(["export", str(original), str(out), "--quiet"]) == 0
    return native, original, out


@pytest.fixture(scope="module")
def converted(folders):
    return Florence2.load(folders[2], threads=2)


@pytest.fixture(scope="module")
def reference(folders):
    """transformers' native model and processor on the same weights: generate + post-process."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(folders[0]).eval()
    processor = AutoProcessor.from_pretrained(folders[0])

    def run(image, task, text=None, num_beams=1):
        inputs = processor(text=task + (text or ""), images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **inputs, num_beams=num_beams, do_sample=False, max_new_tokens=MAX_NEW_TOKENS
            )
        generated = processor.batch_decode(ids, skip_special_tokens=False)[0]
        return ids[0].tolist(), processor.post_process_generation(generated, task=task, image_size=image.size)

    return run


def test_every_native_name_maps_back_from_the_original():
    for shape in ("tiny", "base"):
        with torch.device("meta"):
            from transformers import Florence2ForConditionalGeneration

            model = Florence2ForConditionalGeneration(testmodels.build_config(shape))
        for key in model.state_dict():
            if key not in testmodels._NATIVE_TIED:
                assert native_name(testmodels.original_name(key)) == key


def test_export_records_the_source_format_and_the_original_vocabulary(folders):
    manifest = json.loads((folders[2] / "flonnx.json").read_text())
    assert manifest["source"]["format"] == "original"
    conversion = manifest["source"]["conversion"]
    assert conversion["final_logits_bias"] == "zero (dropped)"
    assert conversion["unused_tensors"] == ["vision_tower.norms.bias", "vision_tower.norms.weight"]
    assert manifest["model"]["vocab_size"] == ROWS
    assert all(r["equal"] for r in manifest["validation"]["token_parity"])


@pytest.mark.parametrize(("task", "text"), TASKS, ids=[t for t, _ in TASKS])
def test_every_task_equals_the_native_model(converted, reference, task, text):
    image = _image(3)
    tokens, expected = reference(image, task, text)
    result = converted.run_batch([_request(image, task, text)], max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0]
    assert result.tokens == tokens
    assert result.as_dict() == expected


def test_beam_search_equals_the_native_model(converted, reference):
    image = _image(4)
    for task in ("<OD>", "<CAPTION>"):
        tokens, expected = reference(image, task, num_beams=3)
        result = converted.run_batch([_request(image, task, None)], max_new_tokens=MAX_NEW_TOKENS)[0]
        assert (result.tokens, result.as_dict()) == (tokens, expected)


def _request(image, task, text):
    from flonnx.runtime.model import Request

    region = text if text and text.startswith("<loc_") else None
    return Request(image, task, None if region else text, region)


def _assert_same_weights(model, native_model):
    state, expected = model.state_dict(), native_model.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():
        reference = expected[key][: value.shape[0]] if value.shape[0] == ROWS else expected[key]
        assert torch.equal(value, reference), key


@pytest.mark.parametrize(
    "options",
    [
        {"layout": "full", "weights": "bin"},
        {"layout": "compact", "weights": "bin", "dtype": "float32"},
        {"embedding_names": ("language_model.lm_head.weight",)},
        {
            "weights": "bin",
            "embedding_names": (
                "language_model.model.shared.weight",
                "language_model.model.encoder.embed_tokens.weight",
                "language_model.model.decoder.embed_tokens.weight",
                "language_model.lm_head.weight",
            ),
        },
    ],
    ids=["full-bin", "fp32-bin", "lm_head-only", "all-tied-names"],
)
def test_layouts_and_weight_files_convert_to_the_same_model(native_model, tmp_path, options):
    folder = testmodels.save_original(native_model, tmp_path / "original", **options)
    model, processor, report = load_original(folder)
    _assert_same_weights(model, native_model)
    assert report["vocab_size"] == ROWS
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert processor.tokenizer.convert_tokens_to_ids("<loc_0>") == 50269


def test_wrong_top_level_ids_are_taken_from_text_config(native_model, tmp_path):
    folder = testmodels.save_original(native_model, tmp_path / "original", layout="full", bad_ids=True)
    model, _, report = load_original(folder)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 2, 1)
    assert (generation.decoder_start_token_id, generation.forced_eos_token_id) == (2, 2)
    assert (generation.num_beams, generation.no_repeat_ngram_size) == (3, 3)
    assert report["config_corrections"] == {
        "bos_token_id": [2, 0],
        "pad_token_id": [0, 1],
        "eos_token_id": [1, 2],
    }


def test_config_sizes_that_disagree_with_the_tensors_follow_the_tensors(native_model, tmp_path):
    folder = testmodels.save_original(native_model, tmp_path / "original")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 4096
    config["vision_config"]["model_type"] = ""
    (folder / "config.json").write_text(json.dumps(config))
    model, _, report = load_original(folder)
    assert model.config.text_config.max_position_embeddings == 1024
    assert report["config_corrections"]["max_position_embeddings"] == [4096, 1024]


def test_nonzero_final_logits_bias_becomes_the_logits_bias(native_model, tmp_path):
    bias = torch.randn(ROWS, generator=torch.Generator().manual_seed(0)).half().float()
    folder = testmodels.save_original(native_model, tmp_path / "original", logits_bias=bias)
    model, _, report = load_original(folder)
    assert report["final_logits_bias"].startswith("non-zero")
    assert torch.equal(model.lm_head.bias, bias)
    hidden = torch.randn(1, 3, model.config.text_config.d_model)
    with torch.no_grad():
        expected = native_model.lm_head(hidden)[..., :ROWS] + bias
        assert torch.allclose(model.lm_head(hidden), expected, atol=1e-5)
    # the exported decoder carries it: validation compares the graphs with this model
    manifest = export(str(folder), tmp_path / "export", image_size=64, progress=Progress(quiet=True))
    assert manifest["validation"]["passed"]


def test_malicious_pickle_is_refused_and_runs_nothing(native_model, tmp_path):
    folder = testmodels.save_original(native_model, tmp_path / "original", weights="bin")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"language_model.model.shared.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="refusing .*pytorch_model.bin.*other than tensors"):
        load_original(folder)
    assert not marker.exists()
    assert cli.main(["export", str(folder), str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_tensors_and_missing_weights_are_named(native_model, tmp_path):
    folder = testmodels.save_original(native_model, tmp_path / "original", weights="bin", dtype="float32")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "language_model.adapter.weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="does not know: language_model.adapter.weight"):
        load_original(folder)
    del state["vision_tower.convs.0.proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="no tensor for model.vision_tower.convs.0.conv.weight"):
        load_original(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ExportError, match="no weights: expected one of model.safetensors, pytorch_model.bin"):
        load_original(folder)


def test_base_shape_converts_to_the_same_weights(tmp_path):
    """Full-size base (random weights): fp16 safetensors as Microsoft ships them, back to native."""
    model = testmodels.native_for_original(testmodels.build_model("base", seed=0))
    folder = testmodels.save_original(model, tmp_path / "original")
    converted, _, report = load_original(folder)
    _assert_same_weights(converted, model)
    assert sum(p.numel() for p in converted.parameters()) == testmodels.parameter_count("base") - 39 * 768


# -- the real files in ../shared -------------------------------------------------------------------


def _real_tokenizer():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(
        str(_reference_file("microsoft", "Florence-2-large-ft", "tokenizer.json"))
    )
    assert add_florence_tokens(tokenizer)  # plain BART: the tokens are added, as the processor did
    tokenizer.add_special_tokens(["<image>"])
    return tokenizer


@pytest.mark.parametrize(
    ("path", "billions", "corrections"),
    [
        (("microsoft", "Florence-2-base", "config.json"), 0.23, {}),
        (("microsoft", "Florence-2-large-ft", "config.json"), 0.77, {}),
        (("onnx-community", "Florence-2-base-ft", "config.json"), 0.23, {}),
        (
            ("finetunes", "omniparser_icon_caption_florence", "config.json"),
            0.23,
            {"bos_token_id": [2, 0], "pad_token_id": [0, 1], "eos_token_id": [1, 2]},
        ),
    ],
    ids=["base", "large-ft", "onnx-community-base-ft", "omniparser"],
)
def test_real_configs_build_models_of_the_real_size(path, billions, corrections):
    from transformers import Florence2ForConditionalGeneration

    config = json.loads(_reference_file(*path).read_text())
    report: dict = {}
    native, ids = native_config(config, _real_tokenizer(), report=report)
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(native)
    count = sum(p.numel() for p in model.parameters())
    shape = "base" if billions < 0.5 else "large"
    assert count == testmodels.parameter_count(shape) - 39 * native.text_config.d_model
    assert round(count / 1e9, 2) == billions
    assert ids["eos_token_id"] == 2 and ids["decoder_start_token_id"] == 2
    assert report.get("config_corrections", {}) == corrections


def test_real_tokenizer_gets_the_florence_tokens_at_their_ids():
    tokenizer = _real_tokenizer()
    fixture = testmodels.build_tokenizer()
    for offset, token in enumerate(FLORENCE_TOKENS):
        assert tokenizer.token_to_id(token) == 50265 + offset == fixture.convert_tokens_to_ids(token)
    prompt = "<s>What is the region <loc_10><loc_20><loc_300><loc_999>?</s>"
    assert tokenizer.encode(prompt, add_special_tokens=False).ids == fixture.encode(
        prompt, add_special_tokens=False
    )
