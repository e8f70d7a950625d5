"""Microsoft's original (remote-code) Florence-2 checkpoints to a native model, without their code.

`microsoft/Florence-2-{base,large}{,-ft}` and the fine-tunes trained from them keep the layout of
the remote `modeling_florence2.py`: a DaViT `vision_tower` with `PreNorm` wrappers, the projector's
tensors at the top level, a BART `language_model` with 51289 vocabulary rows and a
`final_logits_bias`, and a plain BART `tokenizer.json` to which the remote processor adds the
Florence tokens at load time. This module reads such a folder as data only: JSON, safetensors, or
a `.bin` through `torch.load(weights_only=True)` (which refuses any pickle that is not tensors);
no `.py` file of the folder is imported and no remote code runs.

The key mapping is the one of transformers' `convert_florence2_original_pytorch_to_hf.py`, with
the differences a real checkpoint needs, each recorded in the conversion report:
- the vocabulary stays at the checkpoint's rows (51289): no `<image>` row is added, so the logits
  have exactly the columns the original model had (transformers pads to 51328);
- `final_logits_bias` is dropped only when it is zero; a fine-tune's non-zero bias becomes the
  native `lm_head`'s bias (transformers drops it silently);
- ids come from `text_config` (what the remote `generate` used), not from the top-level
  `bos/eos/pad`, which some fine-tunes carry wrong (bos 2 / eos 1 / pad 0), and must agree with the
  tokenizer;
- `max_position_embeddings` and the image position tables are read off the tensors;
- the tied embedding is taken from whichever of its four names the file holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flonnx.runtime.errors import ExportError
from flonnx.runtime.vocabulary import ORIGINAL_VOCAB_SIZE, add_florence_tokens

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ORIGINAL_VISION_TYPES = ("davit", "", "florence2_vision")
POSITION_OFFSET = 2  # BART's learned positions keep two extra rows
TIED = (
    "language_model.model.shared.weight",
    "language_model.model.encoder.embed_tokens.weight",
    "language_model.model.decoder.embed_tokens.weight",
    "language_model.lm_head.weight",
)
# Parts of the original DaViT that Florence-2 never runs (it uses `forward_features_unpool`).
UNUSED = re.compile(r"vision_tower\.(norms|head)\.")
_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\."
# Original name -> native name, first match wins.
RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^vision_tower\.convs\.(\d+)\.proj\.(weight|bias)$", r"model.vision_tower.convs.\1.conv.\2"),
        (r"^vision_tower\.convs\.(\d+)\.norm\.(weight|bias)$", r"model.vision_tower.convs.\1.norm.\2"),
        (rf"^{_BLOCK}(conv[12])\.fn\.dw\.(weight|bias)$", r"model.vision_tower.blocks.\1.\2.\3.\4.\5"),
        (
            rf"^{_BLOCK}(window_attn|channel_attn)\.norm\.(weight|bias)$",
            r"model.vision_tower.blocks.\1.\2.\3.norm1.\5",
        ),
        (
            rf"^{_BLOCK}(window_attn|channel_attn)\.fn\.(qkv|proj)\.(weight|bias)$",
            r"model.vision_tower.blocks.\1.\2.\3.\4.\5.\6",
        ),
        (rf"^{_BLOCK}ffn\.norm\.(weight|bias)$", r"model.vision_tower.blocks.\1.\2.\3.norm2.\4"),
        (
            rf"^{_BLOCK}ffn\.fn\.net\.(fc[12])\.(weight|bias)$",
            r"model.vision_tower.blocks.\1.\2.\3.ffn.\4.\5",
        ),
        (r"^image_projection$", r"model.multi_modal_projector.image_projection.weight"),
        (r"^image_proj_norm\.(weight|bias)$", r"model.multi_modal_projector.image_proj_norm.\1"),
        (
            r"^image_pos_embed\.(row|column)_embeddings\.weight$",
            r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight",
        ),
        (
            r"^visual_temporal_embed\.pos_idx_to_embed$",
            r"model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
        ),
        (r"^language_model\.model\.(.+)$", r"model.language_model.\1"),
        (r"^language_model\.lm_head\.weight$", r"lm_head.weight"),
    )
)
# BART architecture keys taken from the original text_config (the rest are generation settings,
# labels and bookkeeping of transformers 4.x).
TEXT_KEYS = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "init_std",
    "scale_embedding",
)
SPECIAL_IDS = {"bos_token_id": "<s>", "pad_token_id": "<pad>", "eos_token_id": "</s>"}
# What the remote `generate` took from text_config, and transformers 4.x's defaults: a key is kept
# when the checkpoint sets it to something else.
GENERATION_DEFAULTS = {
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "early_stopping": False,
    "length_penalty": 1.0,
    "repetition_penalty": 1.0,
    "min_length": 0,
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_return_sequences": 1,
}


def native_name(key: str) -> str | None:
    """The native `Florence2ForConditionalGeneration` name of an original state-dict key."""
    for pattern, replacement in RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def is_original_config(config: dict) -> bool:
    """True for the remote-code layout (any of its config.json variants), False for native."""
    vision = config.get("vision_config") or {}
    return "dim_embed" in vision or vision.get("model_type") in ORIGINAL_VISION_TYPES


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise ExportError(f"{path} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None


# -- weights -------------------------------------------------------------------------------------


def load_state_dict(folder: Path) -> tuple[dict, str]:
    """The checkpoint's tensors (float32) and the file they came from; never runs pickled code."""
    import torch

    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise ExportError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ExportError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    else:
        import pickle

        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()[0]
            raise ExportError(
                f"refusing {path}: it holds objects other than tensors, which flonnx never unpickles "
                f"(torch.load weights_only=True said: {first})"
            ) from None
        except Exception as error:  # truncated or not a torch file
            raise ExportError(f"cannot read {path}: {type(error).__name__}: {error}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ExportError(f"{path} is not a state dict of tensors")
    return {key: value.float() for key, value in tensors.items()}, path.name


def _tied_embedding(tensors: dict, report: dict):
    import torch

    present = [name for name in TIED if name in tensors]
    if not present:
        raise ExportError(f"the checkpoint has no token embedding: none of {', '.join(TIED)}")
    table = tensors[present[0]]
    for name in present[1:]:
        if tensors[name].shape != table.shape or not torch.equal(tensors[name], table):
            raise ExportError(
                f"{name} differs from {present[0]}: Florence-2 ties them; "
                "an untied checkpoint is not supported"
            )
    report["tied_embedding_from"] = present
    return table


def map_state_dict(tensors: dict, report: dict) -> dict:
    """Original tensors -> native names; every key is mapped, known unused, or an error."""
    import torch

    table = _tied_embedding(tensors, report)
    mapped, unused, unknown = {}, [], []
    for key, value in tensors.items():
        if key in TIED:
            continue
        if key == "language_model.final_logits_bias":
            continue
        if UNUSED.match(key):
            unused.append(key)
            continue
        name = native_name(key)
        if name is None:
            unknown.append(key)
            continue
        mapped[name] = value.t().contiguous() if key == "image_projection" else value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ExportError(f"the checkpoint has tensors this converter does not know: {shown}")
    mapped["model.language_model.shared.weight"] = table
    report["unused_tensors"] = sorted(unused)
    bias = tensors.get("language_model.final_logits_bias")
    if bias is not None and bias.numel() != table.shape[0]:
        raise ExportError(f"final_logits_bias has {bias.numel()} values for {table.shape[0]} vocabulary rows")
    if bias is None:
        report["final_logits_bias"] = "absent"
    elif torch.count_nonzero(bias) == 0:
        report["final_logits_bias"] = "zero (dropped)"
    else:
        report["final_logits_bias"] = f"non-zero (max |b| {bias.abs().max().item():.3g}): lm_head bias"
        mapped["lm_head.bias"] = bias.reshape(-1)
    return mapped


# -- configs -------------------------------------------------------------------------------------


def _vision_config(original: dict, tensors: dict, top: dict, report: dict):
    from transformers import Florence2VisionConfig

    temporal = original.get("visual_temporal_embedding") or {"type": "COSINE", "max_temporal_embeddings": 100}
    position = original.get("image_pos_embed") or {"type": "learned_abs_2d", "max_pos_embeddings": 50}
    sources = original.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
    checks = {
        "visual_temporal_embedding.type": (temporal.get("type"), "COSINE"),
        "image_pos_embed.type": (position.get("type"), "learned_abs_2d"),
        "image_feature_source": (list(sources), ["spatial_avg_pool", "temporal_avg_pool"]),
    }
    for key, (value, supported) in checks.items():
        if value != supported:
            raise ExportError(
                f"vision_config {key} is {value!r}; Florence-2 (and flonnx) support {supported!r}"
            )
    rows = tensors.get("image_pos_embed.row_embeddings.weight")
    grid = rows.shape[0] if rows is not None else position["max_pos_embeddings"]
    temporal_rows = tensors.get("visual_temporal_embed.pos_idx_to_embed")
    frames = temporal_rows.shape[0] if temporal_rows is not None else temporal["max_temporal_embeddings"]
    if grid != position["max_pos_embeddings"]:
        report.setdefault("config_corrections", {})["vision max_pos_embeddings"] = [
            position["max_pos_embeddings"],
            grid,
        ]
    projection = tensors.get("image_projection")
    projection_dim = projection.shape[1] if projection is not None else top.get("projection_dim")
    try:
        return Florence2VisionConfig(
            embed_dim=list(original["dim_embed"]),
            depths=list(original["depths"]),
            num_heads=list(original["num_heads"]),
            num_groups=list(original["num_groups"]),
            patch_size=list(original["patch_size"]),
            patch_stride=list(original["patch_stride"]),
            patch_padding=list(original["patch_padding"]),
            patch_prenorm=list(original["patch_prenorm"]),
            window_size=original["window_size"],
            drop_path_rate=original.get("drop_path_rate", 0.1),
            projection_dim=projection_dim or original.get("projection_dim"),
            max_temporal_embeddings=frames,
            max_position_embeddings=grid,
        )
    except KeyError as error:
        raise ExportError(f"config.json vision_config has no {error.args[0]!r}") from None


def _special_ids(text: dict, top: dict, tokenizer, report: dict) -> dict:
    """bos/pad/eos from text_config (what the remote model used), checked against the tokenizer."""
    ids = {}
    for key, token in SPECIAL_IDS.items():
        expected = tokenizer.token_to_id(token)
        value = text.get(key, expected)
        if value != expected:
            raise ExportError(
                f"config.json text_config {key} is {value!r} but the tokenizer has {token} = {expected}"
            )
        if key in top and top[key] != value:
            report.setdefault("config_corrections", {})[key] = [top[key], value]
        ids[key] = value
    ids["decoder_start_token_id"] = text.get("decoder_start_token_id", ids["eos_token_id"])
    ids["forced_eos_token_id"] = text.get("forced_eos_token_id", ids["eos_token_id"])
    return ids


def _text_config(text: dict, tensors: dict, ids: dict, report: dict):
    """`tensors`: the mapped (native-named) state dict, or {} to read every size off the config."""
    from transformers import BartConfig

    positions = tensors.get("model.language_model.encoder.embed_positions.weight")
    configured = text.get("max_position_embeddings", 1024)
    max_positions = configured if positions is None else positions.shape[0] - POSITION_OFFSET
    if configured != max_positions:
        report.setdefault("config_corrections", {})["max_position_embeddings"] = [configured, max_positions]
    missing = [key for key in ("d_model", "encoder_layers", "decoder_layers") if key not in text]
    if missing:
        raise ExportError(f"config.json text_config has no {missing[0]!r}")
    settings = {key: text[key] for key in TEXT_KEYS if key in text}
    table = tensors.get("model.language_model.shared.weight")
    vocab = table.shape[0] if table is not None else text.get("vocab_size", ORIGINAL_VOCAB_SIZE)
    return BartConfig(
        **settings,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **ids,
    )


def native_config(config: dict, tokenizer, tensors: dict | None = None, report: dict | None = None):
    """(Florence2Config, special ids) of an original config.json; sizes from `tensors` (mapped
    state dict) where given, else from the config."""
    from transformers import Florence2Config

    report = {} if report is None else report
    tensors = tensors or {}
    text = config.get("text_config") or {}
    ids = _special_ids(text, config, tokenizer, report)
    native = Florence2Config(
        vision_config=_vision_config(config.get("vision_config") or {}, _originals(tensors), config, report),
        text_config=_text_config(text, tensors, ids, report),
        image_token_id=tokenizer.token_to_id("<image>"),
    )
    return native, ids


def generation_settings(text: dict, ids: dict) -> dict:
    """The generation config the remote `generate` ran with: text_config's settings and ids."""
    settings = {
        key: text[key] for key, default in GENERATION_DEFAULTS.items() if key in text and text[key] != default
    }
    if settings.get("num_beams", 1) == 1:  # beam-only flags; transformers refuses to save them alone
        for key in ("early_stopping", "length_penalty"):
            settings.pop(key, None)
    settings.update(ids)
    if "forced_bos_token_id" in text and text["forced_bos_token_id"] is not None:
        settings["forced_bos_token_id"] = text["forced_bos_token_id"]
    return settings


# -- processor -----------------------------------------------------------------------------------


def _tokenizer(folder: Path):
    from tokenizers import AddedToken, Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing (Florence-2 checkpoints ship BART's tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise ExportError(f"cannot read {path}: {error}") from None
    try:
        add_florence_tokens(tokenizer, str(path))
    except Exception as error:
        raise ExportError(str(error)) from None
    if tokenizer.token_to_id("<image>") is None:  # the native processor's image placeholder
        tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tokenizer


def build_processor(folder: Path, tokenizer, max_positions: int):
    """A native Florence2Processor from the folder's preprocessor_config.json and tokenizer."""
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Processor

    from flonnx.runtime.postprocess import DEFAULT_POST_PROCESSOR_CONFIG
    from flonnx.runtime.vocabulary import FLORENCE_TOKENS

    from .testmodels import IMAGENET_MEAN, IMAGENET_STD

    settings = read_json(folder / "preprocessor_config.json", required=False) or {}
    size = settings.get("size") or {"height": 768, "width": 768}
    image_processor = CLIPImageProcessorPil(
        do_resize=settings.get("do_resize", True),
        size=size,
        resample=settings.get("resample", 3),
        do_center_crop=False,
        crop_size=settings.get("crop_size") or size,
        do_rescale=settings.get("do_rescale", True),
        rescale_factor=settings.get("rescale_factor", 1 / 255),
        do_normalize=settings.get("do_normalize", True),
        image_mean=settings.get("image_mean", IMAGENET_MEAN),
        image_std=settings.get("image_std", IMAGENET_STD),
        do_convert_rgb=True,
        image_seq_length=settings.get("image_seq_length", 577),
    )
    text_tokenizer = BartTokenizer(
        tokenizer_object=tokenizer,
        extra_special_tokens=list(FLORENCE_TOKENS),
        image_token="<image>",
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=text_tokenizer,
        post_processor_config=DEFAULT_POST_PROCESSOR_CONFIG,
    )


# -- the conversion ------------------------------------------------------------------------------


def load_original(src: str | Path) -> tuple[Any, Any, dict]:
    """(native model in eval mode, native processor, conversion report) of an original folder."""
    import torch
    from transformers import Florence2ForConditionalGeneration, GenerationConfig

    folder = Path(src)
    config = read_json(folder / "config.json")
    if config.get("model_type") != "florence2" or not is_original_config(config):
        raise ExportError(f"{folder} is not an original-format Florence-2 checkpoint")
    report: dict = {"format": "original"}
    tokenizer = _tokenizer(folder)
    tensors, report["weights"] = load_state_dict(folder)
    mapped = map_state_dict(tensors, report)
    del tensors
    vocab = mapped["model.language_model.shared.weight"].shape[0]
    if vocab > tokenizer.get_vocab_size(with_added_tokens=True):
        raise ExportError(
            f"the embedding has {vocab} rows but the tokenizer only "
            f"{tokenizer.get_vocab_size(with_added_tokens=True)} tokens"
        )
    report["vocab_size"] = vocab
    native, ids = native_config(config, tokenizer, mapped, report)
    model = Florence2ForConditionalGeneration(native)
    if "lm_head.bias" in mapped:  # a fine-tune's final_logits_bias, kept as the logits' bias
        model.lm_head = torch.nn.Linear(native.text_config.d_model, vocab, bias=True)
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped) - _TIED_NATIVE - _BUFFERS)
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        problems = [f"no tensor for {', '.join(missing[:3])}"] if missing else []
        problems += (
            [f"tensors config.json has no place for: {', '.join(unexpected[:3])}"] if unexpected else []
        )
        raise ExportError("the weights do not fit config.json: " + "; ".join(problems))
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as error:  # shape mismatches: the config says one size, the tensors another
        lines = [line.strip() for line in str(error).splitlines()[1:3]]
        raise ExportError(f"the weights do not fit config.json: {' '.join(lines)}") from None
    model.lm_head.weight = model.get_input_embeddings().weight
    model.generation_config = GenerationConfig(**generation_settings(config.get("text_config") or {}, ids))
    processor = build_processor(folder, tokenizer, native.text_config.max_position_embeddings)
    return model.eval(), processor, report


# Native keys that need no tensor of their own: the tied copies of the shared embedding, and the
# cosine table, which the native model computes itself when a checkpoint leaves it out.
_TIED_NATIVE = {
    "lm_head.weight",
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
}
_BUFFERS = {"model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"}


def _originals(mapped: dict) -> dict:
    """The few tensors the vision config is read from, under their original names."""
    names = {
        "model.multi_modal_projector.image_position_embed.row_embeddings.weight": (
            "image_pos_embed.row_embeddings.weight"
        ),
        "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed": (
            "visual_temporal_embed.pos_idx_to_embed"
        ),
    }
    found = {original: mapped[native] for native, original in names.items() if native in mapped}
    projection = mapped.get("model.multi_modal_projector.image_projection.weight")
    if projection is not None:
        found["image_projection"] = projection.t()
    return found
