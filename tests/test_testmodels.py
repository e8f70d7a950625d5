"""The random-weight Florence-2 checkpoints that export tests start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flonnx.export import testmodels

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

CAPTION_IDS = [0, 2264, 473, 5, 2274, 6190, 116, 2]  # "<s>What does the image describe?</s>"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return transformers.Florence2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return transformers.AutoProcessor.from_pretrained(tiny_model_dir)


def images() -> list:
    gradient = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    return [gradient, Image.new("RGB", (640, 480), (200, 30, 30))]


def test_folder_is_a_native_checkpoint(tiny_model_dir: Path, model, processor) -> None:
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert model.config.text_config.vocab_size == testmodels.EMBEDDING_ROWS
    assert model.get_input_embeddings().weight.shape == (51328, 64)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert isinstance(processor, transformers.Florence2Processor)
    assert (processor.image_token, processor.image_token_id) == ("<image>", 51289)
    assert processor.post_processor_config == testmodels.POST_PROCESSOR_CONFIG


def test_generation_config_is_the_released_one(tiny_model_dir: Path) -> None:
    saved = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert {k: saved[k] for k in testmodels.GENERATION_DEFAULTS} == testmodels.GENERATION_DEFAULTS


def test_processor_input_ids(processor) -> None:
    inputs = processor(text="<CAPTION>", images=images()[0], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [51289] * 577 + CAPTION_IDS
    assert inputs["pixel_values"].shape == (1, 3, 768, 768)


def test_processor_normalizes_with_imagenet_stats(processor) -> None:
    white = Image.new("RGB", (50, 30), "white")
    pixels = processor(text="<OD>", images=white, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(testmodels.IMAGENET_MEAN), torch.tensor(testmodels.IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 5, 7], (1 - mean) / std)


def test_generate_depends_on_the_image(model, processor) -> None:
    outputs = []
    for image in images():
        inputs = processor(text="<OD>", images=image, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=24, num_beams=1, do_sample=False)[0].tolist()
        assert ids[:2] == [2, 0]  # decoder start, then the forced <s>
        assert 2 not in ids[1:-1], "random weights should not end generation early"
        assert len(ids) == 25
        outputs.append(ids)
    assert outputs[0] != outputs[1]


def test_eval_forward_is_deterministic(model, processor) -> None:
    inputs = processor(text="<CAPTION>", images=images()[0], return_tensors="pt")
    decoder_input_ids = torch.tensor([[2, 0]])
    with torch.no_grad():
        first, second = (model(**inputs, decoder_input_ids=decoder_input_ids).logits for _ in range(2))
    assert model.config.vision_config.drop_path_rate > 0  # present as in the real checkpoints, inert in eval
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_seed_decides_the_weights() -> None:
    a, b, c = (testmodels.build_model("tiny", seed).state_dict() for seed in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("lm_head.weight", "model.vision_tower.convs.0.conv.weight"):
        assert not torch.equal(a[name], c[name])


def test_padding_rows_are_the_mean_row() -> None:
    weight = testmodels.build_model("tiny").get_input_embeddings().weight.detach()
    mean = weight[: testmodels.TOKENIZER_SIZE].mean(dim=0)
    torch.testing.assert_close(weight[testmodels.TOKENIZER_SIZE :], mean.expand(51328 - 51290, -1))


def test_post_process_object_detection(processor) -> None:
    text = "</s><s>car<loc_100><loc_200><loc_300><loc_400>wheel<loc_0><loc_999><loc_10><loc_20></s>"
    parsed = processor.post_process_generation(text, task="<OD>", image_size=(1000, 500))
    expected = {"bboxes": [[100, 100, 300, 200], [0, 499, 10, 10]], "labels": ["car", "wheel"]}
    assert parsed == {"<OD>": expected}


def test_phrase_grounding_drops_banned_phrases(processor) -> None:
    text = "</s><s>it<loc_1><loc_2><loc_3><loc_4>a dog<loc_10><loc_20><loc_30><loc_40></s>"
    task = "<CAPTION_TO_PHRASE_GROUNDING>"
    parsed = processor.post_process_generation(text, task=task, image_size=(1000, 1000))
    assert parsed[task]["labels"] == ["a dog"]


def test_image_size_sets_the_image_token_count() -> None:
    assert testmodels.build_processor(image_size=384).num_image_tokens == 145
    with pytest.raises(ValueError, match="multiple of 32"):
        testmodels.build_processor(image_size=300)


def test_unknown_shape_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="tiny, base, large"):
        testmodels.build_model("huge")


# Built on the meta device: no weights are allocated, so this is fast.
@pytest.mark.parametrize(("shape", "millions"), [("base", 231.4), ("large", 770.2)])
def test_parameter_counts_match_the_released_models(shape: str, millions: float) -> None:
    assert testmodels.parameter_count(shape) / 1e6 == pytest.approx(millions, abs=0.1)
