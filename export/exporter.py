"""`flonnx export SRC OUT`: a native Florence-2 checkpoint to a validated export folder.

The folder is built in a temporary directory beside OUT and moved into place only after
validation passed, so OUT is either the old folder, nothing, or a complete export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flonnx.runtime.errors import ExportError
from flonnx.runtime.manifest import (
    COMPONENTS,
    CONFIG_FILES,
    FORMAT_VERSION,
    MANIFEST,
    file_record,
    sha256_file,
    write_json_atomic,
)
from flonnx.runtime.staging import Progress, move_into_place, prepare, recover
from flonnx.runtime.staging import check_out as check_writable

from .graphs import Decoder, DecoderShape, EmbedTokens, TextEncoder, VisionEncoder, past_names
from .onnxfile import save_onnx
from .simplify import fold_reshape_shapes, fold_weight_identities

OPSET = 17
# Written when the checkpoint's processor has them; listed in the manifest when present.
OPTIONAL_FILES = ("processor_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
DEFAULT_IMAGE_SIZE = 768
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its torch wrapper, example inputs, I/O names and dynamic axes."""

    name: str
    module: object
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict


def check_image_size(image_size: int, model_config) -> int:
    positions = model_config.text_config.max_position_embeddings
    grid_limit = model_config.vision_config.max_position_embeddings
    largest = 32 * min(grid_limit, int((positions - 64 - 1) ** 0.5))
    if not isinstance(image_size, int) or image_size % 32 or not 32 <= image_size <= largest:
        raise ExportError(
            f"--image-size {image_size!r} is not valid: use a multiple of 32 from 32 to {largest} "
            f"(the image tokens and a prompt must fit in {positions} encoder positions)"
        )
    return image_size


def _read_config(src: str) -> dict | None:
    path = Path(src) / "config.json"
    if not Path(src).exists():
        return None
    if not path.is_file():
        raise ExportError(f"{src} is not a Hugging Face checkpoint folder: config.json is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None


def check_source(src: str) -> str:
    """The checkpoint's format, "native" or "original"; refuses anything else before loading weights."""
    config = _read_config(src)
    if config is None:
        if not HUB_ID.fullmatch(src):
            raise ExportError(f"checkpoint folder not found: {src}")
        return "hub"  # decided once config.json is downloaded
    model_type = config.get("model_type")
    if model_type != "florence2":
        raise ExportError(f"{src} is not a Florence-2 checkpoint (config.json model_type is {model_type!r})")
    from .original import is_original_config

    return "original" if is_original_config(config) else "native"


def _download(src: str) -> str:
    """A hub id's files (configs, tokenizer, weights; never code) in the local cache."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"])
    except Exception as error:  # offline, unknown repo, gated repo: one line
        raise ExportError(f"cannot download checkpoint {src}: {str(error).splitlines()[0]}") from None


def load_checkpoint(src: str) -> tuple:
    """(native model, native processor, conversion report or None) of a folder or hub id."""
    kind = check_source(src)
    if kind == "hub":
        src = _download(src)
        kind = check_source(src)
    if kind == "original":
        from .original import load_original

        return load_original(src)
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    try:
        model = Florence2ForConditionalGeneration.from_pretrained(src, dtype="float32").eval()
        processor = AutoProcessor.from_pretrained(src)
    except OSError as error:
        raise ExportError(f"cannot load checkpoint {src}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # safetensors, json and torch raise many types for a damaged checkpoint
        raise ExportError(f"cannot load checkpoint {src}: {type(error).__name__}: {error}") from None
    return model, processor, None


def conversion_summary(conversion: dict) -> str:
    """One progress line: what converting an original checkpoint did."""
    parts = [
        f"converted {conversion['weights']}: vocabulary {conversion['vocab_size']} rows",
        f"final_logits_bias {conversion['final_logits_bias']}",
    ]
    if conversion.get("unused_tensors"):
        parts.append(f"{len(conversion['unused_tensors'])} unused tensors left out")
    for key, (configured, used) in conversion.get("config_corrections", {}).items():
        parts.append(f"{key} {configured} in config.json, {used} used")
    return "; ".join(parts)


def graph_specs(model, image_size: int) -> list[GraphSpec]:
    import torch

    shape = DecoderShape.of(model)
    d_model = model.config.text_config.d_model
    n_image = (image_size // 32) ** 2 + 1
    # Batch 2 in every example keeps the batch axis dynamic in every exporter.
    batch, prompt, past, encoder_length = 2, 9, 3, n_image + 9
    ids = torch.randint(3, 50000, (batch, prompt))
    mask = torch.ones(batch, encoder_length, dtype=torch.long)
    hidden = torch.randn(batch, encoder_length, d_model)
    heads, head_dim = shape.heads, shape.head_dim

    def cache(length_of):
        return tuple(torch.randn(batch, heads, length_of(n), head_dim) for n in past_names(shape.layers))

    encoder_axes = {0: "batch_size", 1: "encoder_sequence_length"}
    decoder_axes = {0: "batch_size", 1: "decoder_sequence_length"}

    def cache_axes(names, decoder_length):
        return {
            n: {0: "batch_size", 2: "encoder_sequence_length" if ".encoder." in n else decoder_length}
            for n in names
        }

    first, later = Decoder(model, with_past=False), Decoder(model, with_past=True)
    return [
        GraphSpec(
            "vision_encoder",
            VisionEncoder(model),
            (torch.randn(batch, 3, image_size, image_size),),
            ["pixel_values"],
            ["image_features"],
            {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
        ),
        GraphSpec(
            "embed_tokens",
            EmbedTokens(model),
            (ids,),
            ["input_ids"],
            ["inputs_embeds"],
            {
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            },
        ),
        GraphSpec(
            "encoder_model",
            TextEncoder(model),
            (hidden, mask),
            ["inputs_embeds", "attention_mask"],
            ["last_hidden_state"],
            {
                "inputs_embeds": encoder_axes,
                "attention_mask": encoder_axes,
                "last_hidden_state": encoder_axes,
            },
        ),
        GraphSpec(
            "decoder_model",
            first,
            (torch.randn(batch, 1, d_model), mask, hidden),
            first.input_names(),
            first.output_names(),
            {
                "inputs_embeds": decoder_axes,
                "encoder_attention_mask": encoder_axes,
                "encoder_hidden_states": encoder_axes,
                "logits": decoder_axes,
                **cache_axes(first.output_names()[1:], "decoder_sequence_length"),
            },
        ),
        GraphSpec(
            "decoder_with_past_model",
            later,
            (
                torch.randn(batch, 1, d_model),
                mask,
                *cache(lambda n: encoder_length if ".encoder." in n else past),
            ),
            later.input_names(),
            later.output_names(),
            {
                "inputs_embeds": decoder_axes,
                "encoder_attention_mask": encoder_axes,
                "logits": decoder_axes,
                **cache_axes(past_names(shape.layers), "past_decoder_sequence_length"),
                **cache_axes(later.output_names()[1:], "past_decoder_sequence_length + 1"),
            },
        ),
    ]


def export_graph(spec: GraphSpec, path: Path) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo; it traces these graphs
        # faithfully and in seconds, and names weights after their modules.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(),
            spec.args,
            str(path),
            input_names=spec.inputs,
            output_names=spec.outputs,
            dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def simplify_file(path: Path) -> None:
    """Fold the graph's run-time Reshape shapes and weight Identities (simplify.py) and move its
    weights beside it."""
    import onnx

    model = onnx.load(str(path))
    fold_reshape_shapes(model)
    fold_weight_identities(model)
    save_onnx(model, path)


def write_configs(model, processor, folder: Path, image_size: int) -> None:
    """The Hugging Face JSON files, plus the prompt and post-processing tables the runtime reads."""
    n_image = (image_size // 32) ** 2 + 1
    image_processor = processor.image_processor
    image_processor.size = {"height": image_size, "width": image_size}
    if hasattr(image_processor, "crop_size") and getattr(image_processor, "do_center_crop", False):
        image_processor.crop_size = {"height": image_size, "width": image_size}
    image_processor.image_seq_length = n_image
    processor.num_image_tokens = n_image
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    # transformers 5 keeps the image settings inside processor_config.json; other runtimes and
    # ours read preprocessor_config.json, so it is written in full, with the task tables.
    # transformers.js's AutoProcessor picks its class by `processor_class` there; without it, it
    # builds a bare image processor that has no construct_prompts or post_process_generation.
    preprocessor = image_processor.to_dict()
    preprocessor.update(
        processor_class="Florence2Processor",
        image_seq_length=n_image,
        task_prompts_without_inputs=processor.task_prompts_without_inputs,
        task_prompts_with_input=processor.task_prompts_with_input,
        tasks_answer_post_processing_type=processor.tasks_answer_post_processing_type,
        post_processor_config=processor.post_processor_config,
    )
    write_json_atomic(folder / "preprocessor_config.json", preprocessor)
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"the checkpoint's processor did not provide {', '.join(missing)}")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from flonnx.runtime.info import version

    return {
        "flonnx": version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "exporter": "torch.onnx TorchScript",
        "opset": OPSET,
    }


def _source(src: str, model, conversion: dict | None) -> dict:
    folder = Path(src)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    source = {
        "id": str(folder.resolve()) if folder.is_dir() else src,
        "format": "original" if conversion else "native",
        "revision": getattr(model.config, "_commit_hash", None),
        "weights_sha256": {path.name: sha256_file(path) for path in weights},
    }
    if conversion:
        source["conversion"] = conversion
    return source


def _entry(folder: Path, component: str) -> dict:
    entry = {"file": f"onnx/{component}.onnx", "dtype": "fp32"}
    if (folder / f"onnx/{component}.onnx.data").is_file():  # the weights, beside the graph
        entry["data"] = [f"onnx/{component}.onnx.data"]
    return entry


def build_manifest(
    src: str,
    model,
    folder: Path,
    image_size: int,
    report: dict,
    io_names: dict,
    conversion: dict | None = None,
) -> dict:
    shape = DecoderShape.of(model)
    text = model.config.text_config
    files = [f"onnx/{name}.onnx" for name in COMPONENTS] + list(CONFIG_FILES)
    files += sorted(str(p.relative_to(folder)) for p in (folder / "onnx").glob("*.data"))
    files += [name for name in OPTIONAL_FILES if (folder / name).is_file()]
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": _source(src, model, conversion),
        "tools": _versions(),
        "model": {
            "image_size": image_size,
            "num_image_tokens": (image_size // 32) ** 2 + 1,
            "d_model": text.d_model,
            "decoder_layers": shape.layers,
            "decoder_heads": shape.heads,
            "head_dim": shape.head_dim,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
        },
        "variants": {"fp32": {name: _entry(folder, name) for name in COMPONENTS}},
        "io": io_names,
        "files": {name: file_record(folder, name) for name in files},
        "validation": report,
    }


def check_out(out: Path, force: bool) -> None:
    """Refuse an OUT that cannot be written before any weights are loaded."""
    check_writable(out, force, "OUT", ExportError)


def export(
    src: str,
    out: str | os.PathLike,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Export, validate and write the folder; returns the manifest."""
    import onnx
    import torch

    progress = progress or Progress()
    out = Path(out)
    kind = check_source(str(src))
    recover(out)
    check_out(out, force)
    progress(f"loading {src}" + (" (original format: converting to native)" if kind == "original" else ""))
    model, processor, conversion = load_checkpoint(str(src))
    if conversion:
        progress(conversion_summary(conversion))
    image_size = check_image_size(image_size, model.config)
    check_out(out, force)
    staging = prepare(out, ExportError)
    (staging / "onnx").mkdir()
    try:
        torch.manual_seed(0)
        specs = graph_specs(model, image_size)
        io_names = {}
        for spec in specs:
            progress(f"exporting {spec.name}")
            export_graph(spec, staging / "onnx" / f"{spec.name}.onnx")
            if spec.name not in ("decoder_model", "decoder_with_past_model"):  # these two: at the merge
                simplify_file(staging / "onnx" / f"{spec.name}.onnx")
            io_names[spec.name] = {"inputs": spec.inputs, "outputs": spec.outputs}
        progress("merging decoder_model + decoder_with_past_model -> decoder_model_merged")
        from .merge import USE_CACHE_BRANCH, merge_decoders

        shape = DecoderShape.of(model)
        first = staging / "onnx" / "decoder_model.onnx"
        later = staging / "onnx" / "decoder_with_past_model.onnx"
        decoders = [onnx.load(str(first)), onnx.load(str(later))]
        for decoder in decoders:
            fold_reshape_shapes(decoder)
        merged = merge_decoders(*decoders, shape.heads, shape.head_dim)
        del decoders
        onnx.checker.check_model(merged)
        save_onnx(merged, staging / "onnx" / "decoder_model_merged.onnx")
        first.unlink()
        later.unlink()
        first_io, _ = io_names.pop("decoder_model"), io_names.pop("decoder_with_past_model")
        io_names["decoder_model_merged"] = {
            "inputs": [*first_io["inputs"], *past_names(shape.layers), USE_CACHE_BRANCH],
            "outputs": first_io["outputs"],
        }
        progress("writing configs and tokenizer")
        write_configs(model, processor, staging, image_size)
        progress("validating every graph against PyTorch")
        from .validate import validate_export

        report = validate_export(model, processor, staging / "onnx", image_size)
        worst = ", ".join(f"{graph} {diff:.2g}" for graph, diff in report["max_abs_diff"].items())
        parity = ", ".join(f"{r['task']} {r['tokens']} tokens" for r in report["token_parity"])
        progress(f"validation passed: max abs diff {worst}; token parity {parity}")
        manifest = build_manifest(str(src), model, staging, image_size, report, io_names, conversion)
        write_json_atomic(staging / MANIFEST, manifest)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = manifest["files"]
    sizes = ", ".join(
        f"{name} {sum(files[f]['size'] for f in [entry['file'], *entry.get('data', [])]) / 1e6:.1f} MB"
        for name, entry in manifest["variants"]["fp32"].items()
    )
    progress(f"done: {out} ({sizes})")
    return manifest
