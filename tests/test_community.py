"""onnx-community folders (no flonnx.json, original config layout, transformers.js dtype files) run
as they are: made here from the synthetic model, converted to the original format and exported, with
transformers.js's own recipes (`flonnx.export.community`)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from tasks import TASKS

pytest.importorskip("torch")
pytest.importorskip("transformers")

from flonnx.export import testmodels  # noqa: E402
from flonnx.export.community import RECIPES, make_community_folder  # noqa: E402
from flonnx.export.exporter import Progress, export  # noqa: E402
from flonnx.runtime import cli  # noqa: E402
from flonnx.runtime.errors import InputError, ModelFolderError  # noqa: E402
from flonnx.runtime.folder import DTYPE_SUFFIXES  # noqa: E402
from flonnx.runtime.manifest import COMPONENTS  # noqa: E402
from flonnx.runtime.model import Florence2, Request  # noqa: E402
from flonnx.runtime.synthetic import caption, make_scene  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"
IMAGE_SIZE = 160
SEED = 777  # held-out scenes, not the training stream
AGREEMENT_SCENES = 12
# Answer agreement with fp32 each dtype must reach on the synthetic model (measured: see README).
MIN_AGREEMENT = {"fp16": 0.95, "q8": 0.85, "int8": 0.85, "uint8": 0.85, "q4": 0.6, "q4f16": 0.6, "bnb4": 0.6}


@pytest.fixture(scope="module")
def flonnx_export(tmp_path_factory) -> Path:
    """The synthetic model as an original-format checkpoint (51289 rows), exported by flonnx."""
    from transformers import Florence2ForConditionalGeneration

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"no trained model in {SHIPPED}")
    base = tmp_path_factory.mktemp("community")
    model = Florence2ForConditionalGeneration.from_pretrained(SHIPPED, dtype="float32").eval()
    original = testmodels.save_original(
        testmodels.native_for_original(model), base / "original", image_size=160
    )
    config = json.loads((original / "config.json").read_text())
    config["text_config"].update(num_beams=1, no_repeat_ngram_size=0)  # the shipped model's settings
    (original / "config.json").write_text(json.dumps(config))
    out = base / "export"
    export(str(original), out, image_size=IMAGE_SIZE, progress=Progress(quiet=True))
    return out


@pytest.fixture(scope="module")
def community(flonnx_export, tmp_path_factory) -> Path:
    return make_community_folder(flonnx_export, tmp_path_factory.mktemp("community") / "onnx-community")


def _load(folder, variant="fp32", **options) -> Florence2:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no flonnx.json: unverified", tested on its own below
        return Florence2.load(folder, variant=variant, threads=2, **options)


def _requests(scenes: int, seed: int = SEED) -> list[Request]:
    requests = []
    for index in range(scenes):
        scene = make_scene(seed, index)
        requests += [Request(scene.image, task) for task in ("<CAPTION>", "<OD>", "<OCR>")]
        requests.append(Request(scene.image, "<CAPTION_TO_PHRASE_GROUNDING>", caption(scene)))
    return requests


def _task_request(image, task: str, text: str | None) -> Request:
    region = text if text and text.startswith("<loc_") else None
    return Request(image, task, None if region else text, region)


def test_folder_has_the_community_layout(community):
    assert not (community / "flonnx.json").exists()
    assert not list((community / "onnx").glob("*.data"))  # weights inside each graph
    config = json.loads((community / "config.json").read_text())
    assert "dim_embed" in config["vision_config"] and config["vision_config"]["model_type"] == ""
    preprocessor = json.loads((community / "preprocessor_config.json").read_text())
    assert "post_processor_config" not in preprocessor
    names = {p.name for p in (community / "onnx").glob("*.onnx")}
    assert names == {f"{c}{DTYPE_SUFFIXES[d]}.onnx" for c in COMPONENTS for d in RECIPES}


@pytest.mark.parametrize(("task", "text"), TASKS, ids=[t for t, _ in TASKS])
def test_fp32_equals_the_flonnx_export_on_every_task(flonnx_export, community, task, text):
    ours, theirs = _load(flonnx_export), _load(community)
    for index in range(2):
        request = _task_request(make_scene(SEED, index).image, task, text)
        expected, actual = ours.run_batch([request])[0], theirs.run_batch([request])[0]
        assert (actual.tokens, actual.as_dict()) == (expected.tokens, expected.as_dict())


@pytest.mark.parametrize("dtype", [d for d in RECIPES if d != "fp32"])
def test_each_dtype_runs_every_task_and_agrees_with_fp32(community, dtype):
    reference, model = _load(community), _load(community, dtype)
    assert model.dtypes == dict.fromkeys(COMPONENTS, dtype)
    image = make_scene(SEED, 0).image
    every = [_task_request(image, task, text) for task, text in TASKS]
    for result, request in zip(model.run_batch(every, max_new_tokens=24), every):
        assert set(result.as_dict()) == {request.task}
    requests = _requests(AGREEMENT_SCENES)
    expected = reference.run_batch(requests)
    actual = model.run_batch(requests)
    agreement = sum(a.as_dict() == e.as_dict() for a, e in zip(actual, expected)) / len(requests)
    assert agreement >= MIN_AGREEMENT[dtype], f"{dtype}: answers equal to fp32 on {agreement:.0%}"


def test_dtype_per_component(community):
    model = _load(community, {"vision_encoder": "fp16", "decoder_model_merged": "q4"})
    assert model.variant == "vision_encoder=fp16,decoder_model_merged=q4"
    assert model.dtypes["encoder_model"] == "fp32" and model.dtypes["decoder_model_merged"] == "q4"
    assert model.run(make_scene(SEED, 1).image, "<CAPTION>")["<CAPTION>"]


def test_graphs_with_float16_inputs_and_outputs_run(community, tmp_path):
    """A graph converted without keep_io_types takes and returns float16: the runtime casts."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = tmp_path / "copy"
    shutil.copytree(community, copy)
    for component in ("vision_encoder", "encoder_model"):
        half = convert_float_to_float16(onnx.load(str(community / "onnx" / f"{component}.onnx")))
        onnx.save(half, str(copy / "onnx" / f"{component}_fp16.onnx"))
    variant = {"vision_encoder": "fp16", "encoder_model": "fp16"}
    model = _load(copy, variant)
    assert model._sessions["vision_encoder"].get_inputs()[0].type == "tensor(float16)"
    requests = _requests(3)
    expected = _load(community, variant).run_batch(requests)
    agreement = sum(a.as_dict() == e.as_dict() for a, e in zip(model.run_batch(requests), expected))
    assert agreement >= len(requests) - 1


def test_loading_without_a_manifest_warns_once_and_cannot_verify_hashes(community):
    with pytest.warns(UserWarning, match="no flonnx.json: its files are unverified") as caught:
        Florence2.load(community)
    assert len([w for w in caught if "unverified" in str(w.message)]) == 1
    with pytest.raises(InputError, match="no flonnx.json, so there are no hashes"):
        Florence2.load(community, verify="sha256")


def test_unknown_and_absent_dtypes_name_what_exists(community, tmp_path):
    with pytest.raises(InputError, match="unknown variant 'q3'.*fp32, fp16, q8"):
        _load(community, "q3")
    with pytest.raises(InputError, match="unknown dtype 'int3' for vision_encoder"):
        _load(community, {"vision_encoder": "int3"})
    with pytest.raises(InputError, match="unknown component 'vision'"):
        _load(community, {"vision": "q4"})
    copy = tmp_path / "copy"
    shutil.copytree(community, copy)
    (copy / "onnx" / "decoder_model_merged_q4.onnx").unlink()
    with pytest.raises(
        InputError, match="no onnx/decoder_model_merged_q4.onnx .*graphs present: .*decoder_model_merged.onnx"
    ):
        _load(copy, "q4")


def test_wrong_ids_in_generation_config_follow_text_config(community, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(community, copy)
    generation = json.loads((copy / "generation_config.json").read_text())
    generation.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)  # as OmniParser's
    (copy / "generation_config.json").write_text(json.dumps(generation))
    with pytest.warns(UserWarning, match="eos_token_id 1 -> 2"):
        model = Florence2.load(copy, threads=2)
    assert model.generation_config["eos_token_id"] == 2
    image = make_scene(SEED, 2).image
    assert model.run(image, "<OD>") == _load(community).run(image, "<OD>")


def test_small_preprocessor_config_gets_the_default_tables(community, tmp_path):
    """onnx-community/Florence-2-base's preprocessor_config.json has no task tables."""
    copy = tmp_path / "copy"
    shutil.copytree(community, copy)
    preprocessor = json.loads((copy / "preprocessor_config.json").read_text())
    for key in (
        "task_prompts_without_inputs",
        "task_prompts_with_input",
        "tasks_answer_post_processing_type",
    ):
        preprocessor.pop(key)
    (copy / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    requests = _requests(2)
    expected = [r.as_dict() for r in _load(community).run_batch(requests)]
    assert [r.as_dict() for r in _load(copy).run_batch(requests)] == expected


def test_cli_runs_a_community_folder_by_dtype(community, tmp_path, capsys):
    image = tmp_path / "scene.png"
    make_scene(SEED, 3).image.save(image)
    with pytest.warns(UserWarning, match="unverified") as caught:
        assert cli.main(["run", str(community), str(image), "--task", "<CAPTION>", "--dtype", "q8"]) == 0
    assert len(caught) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip())
    expected = _load(community, "q8").run(str(image), "<CAPTION>")
    assert {k: v for k, v in record.items() if k != "image"} == expected
    args = ["run", str(community), str(image), "--task", "<CAPTION>", "--dtype", "vision_encoder=q5"]
    assert cli.main(args) == 2
    assert "unknown dtype 'q5' for vision_encoder" in capsys.readouterr().err


def test_manifest_paths_that_leave_the_folder_are_refused(flonnx_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(flonnx_export, copy)
    manifest = json.loads((copy / "flonnx.json").read_text())
    manifest["variants"]["fp32"]["vision_encoder"]["file"] = "../../../etc/passwd"
    (copy / "flonnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="'../../../etc/passwd' leaves the folder"):
        Florence2.load(copy)
    manifest["variants"]["fp32"]["vision_encoder"]["file"] = "/etc/passwd"
    (copy / "flonnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="'/etc/passwd' is not a path inside"):
        Florence2.load(copy)
    manifest["variants"]["fp32"]["vision_encoder"]["file"] = "onnx/vision_encoder.onnx"
    (copy / "flonnx.json").write_text(json.dumps(manifest))
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to("/etc/hostname")
    with pytest.raises(ModelFolderError, match="'tokenizer.json' leaves the folder"):
        Florence2.load(copy)


def test_quantize_adds_a_variant_from_the_folders_fp32_graphs(community, tmp_path):
    import hashlib

    from flonnx.quantize.stage import Progress as QuantizeProgress
    from flonnx.quantize.stage import quantize

    copy = tmp_path / "copy"
    shutil.copytree(community, copy)

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (copy / "onnx").glob("*.onnx")}

    before = digests()
    with pytest.raises(InputError, match="_quantized.onnx came with the folder .* --variant"):
        quantize(copy, "int8", progress=QuantizeProgress(quiet=True))
    result = quantize(copy, "int8", variant="flonnx-int8", progress=QuantizeProgress(quiet=True))
    assert result.report.passed
    manifest = json.loads((copy / "flonnx.json").read_text())
    assert manifest["source"]["format"] == "onnx-community"
    assert set(manifest["variants"]) == {"fp32", "flonnx-int8"}
    after = digests()
    assert {name: after[name] for name in before} == before  # the folder's own graphs untouched
    model = Florence2.load(copy, variant="flonnx-int8", threads=2, verify="sha256")
    requests = _requests(4)
    expected = _load(community).run_batch(requests)
    same = sum(a.as_dict() == e.as_dict() for a, e in zip(model.run_batch(requests), expected))
    assert same >= len(requests) - 2
    with pytest.warns(UserWarning, match="not recorded in flonnx.json: unverified"):
        Florence2.load(copy, variant="q4", threads=2)  # its own dtypes still load, by suffix
