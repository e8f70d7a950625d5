"""Florence-2 checkpoints with seeded random weights, for tests and benchmarks.

`save_model("tiny", folder)` writes a normal Hugging Face folder in the native
`florence2` format (weights, config, generation config, processor with the real
vocabulary and post-processing rules), so an exporter takes it exactly as it
takes a downloaded checkpoint. `base` and `large` have the real shapes.

Nothing is downloaded: the tokenizer is the fixture that `tools/build_tokenizer.py`
rebuilds offline.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from flonnx.runtime.postprocess import DEFAULT_POST_PROCESSOR_CONFIG

if TYPE_CHECKING:
    import torch
    from transformers import (
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        GenerationConfig,
        PreTrainedTokenizerBase,
    )

TOKENIZER_FIXTURE = "florence2_tokenizer.json.gz"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 51289
TOKENIZER_SIZE = 51290  # BART's 50265 + Florence-2's 1024 + <image>
EMBEDDING_ROWS = 51328  # the native conversion pads the embedding to a multiple of 64
LOC_IDS = slice(50269, 51269)  # <loc_0> .. <loc_999>
PATCH_STRIDE = 32  # DaViT's total downsampling: one image token per 32x32 pixels
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Shape:
    """Architecture of one Florence-2 size: DaViT stages, then a BART encoder-decoder."""

    embed_dim: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    num_groups: tuple[int, int, int, int]
    d_model: int  # also the image projection width
    layers: int  # per encoder and per decoder
    attention_heads: int
    ffn_dim: int
    text_init_std: float = 0.02
    vision_init_std: float = 0.02


SHAPES: dict[str, Shape] = {
    # A larger text init keeps random logits peaked enough that greedy decoding
    # depends on the image and does not end at once.
    "tiny": Shape(
        embed_dim=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        num_groups=(1, 2, 3, 4),
        d_model=64,
        layers=2,
        attention_heads=4,
        ffn_dim=128,
        text_init_std=0.2,
    ),
    "base": Shape(
        embed_dim=(128, 256, 512, 1024),
        depths=(1, 1, 9, 1),
        num_heads=(4, 8, 16, 32),
        num_groups=(4, 8, 16, 32),
        d_model=768,
        layers=6,
        attention_heads=12,
        ffn_dim=3072,
    ),
    "large": Shape(
        embed_dim=(256, 512, 1024, 2048),
        depths=(1, 1, 9, 1),
        num_heads=(8, 16, 32, 64),
        num_groups=(8, 16, 32, 64),
        d_model=1024,
        layers=12,
        attention_heads=16,
        ffn_dim=4096,
    ),
}

# Values of the released checkpoints (microsoft/Florence-2-* config.json and the
# transformers conversion script) that do not change with size.
VISION_DEFAULTS = {
    "patch_size": [7, 3, 3, 3],
    "patch_stride": [4, 2, 2, 2],
    "patch_padding": [3, 1, 1, 1],
    "patch_prenorm": [False, True, True, True],
    "window_size": 12,
    "drop_path_rate": 0.1,
    "mlp_ratio": 4.0,
    "max_temporal_embeddings": 100,
    "max_position_embeddings": 50,
}
TEXT_DEFAULTS = {
    "vocab_size": EMBEDDING_ROWS,
    "max_position_embeddings": 1024,
    "activation_function": "gelu",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "scale_embedding": False,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_eos_token_id": 2,
}
# What generate() gets from a converted checkpoint: the generation settings of the
# original text_config (forced_bos makes outputs start "</s><s>").
GENERATION_DEFAULTS = {
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "num_beams": 3,
    "no_repeat_ngram_size": 3,
    "early_stopping": True,
}
# Florence2Processor's parsing rules as the transformers conversion script writes them (the
# original processor's built-in defaults, which the runtime also falls back to).
POST_PROCESSOR_CONFIG = DEFAULT_POST_PROCESSOR_CONFIG


def load_tokenizer_json() -> str:
    """Florence-2's tokenizer.json (native format, with `<image>`), rebuilt by tools/build_tokenizer.py."""
    data = resources.files("flonnx.export") / "data" / TOKENIZER_FIXTURE
    return gzip.decompress(data.read_bytes()).decode("utf-8")


def florence_special_tokens() -> list[str]:
    """The task and location tokens (ids 50265..51288) that Florence-2 declares additional special tokens."""
    added = json.loads(load_tokenizer_json())["added_tokens"]
    return [t["content"] for t in added if 50265 <= t["id"] < IMAGE_TOKEN_ID]


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"Invalid model shape {name!r}, expected one of: {', '.join(SHAPES)}")
    return SHAPES[name]


def build_config(
    shape: str | Shape, vision_overrides: dict | None = None, text_overrides: dict | None = None
) -> Florence2Config:
    """The Florence2Config of a named shape (or a Shape), with optional sub-config overrides."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    s = get_shape(shape) if isinstance(shape, str) else shape
    vision = Florence2VisionConfig(
        embed_dim=list(s.embed_dim),
        depths=list(s.depths),
        num_heads=list(s.num_heads),
        num_groups=list(s.num_groups),
        projection_dim=s.d_model,
        initializer_range=s.vision_init_std,
        **{**VISION_DEFAULTS, **(vision_overrides or {})},
    )
    text = BartConfig(
        d_model=s.d_model,
        encoder_layers=s.layers,
        decoder_layers=s.layers,
        encoder_attention_heads=s.attention_heads,
        decoder_attention_heads=s.attention_heads,
        encoder_ffn_dim=s.ffn_dim,
        decoder_ffn_dim=s.ffn_dim,
        init_std=s.text_init_std,
        **{**TEXT_DEFAULTS, **(text_overrides or {})},
    )
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)


def build_model(shape: str, seed: int = 0, loc_scale: float = 1.0) -> Florence2ForConditionalGeneration:
    """A model in eval mode with weights that depend only on `shape`, `seed` and `loc_scale`.

    `loc_scale` > 1 scales the `<loc_N>` rows of the tied embedding, so that a random model writes
    boxes and polygons and the parsing of every task gets exercised (2.0 does it for `tiny`).
    """
    import torch
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration(build_config(shape))
    randomize_weights(model, get_shape(shape), seed)
    if loc_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight[LOC_IDS] *= loc_scale
    model.generation_config = generation_config()
    return model.eval()


def randomize_weights(model: torch.nn.Module, shape: Shape, seed: int) -> None:
    """Normal weights; random biases and norm affines so that no export path sees an all-zero tensor."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights come once
            std = shape.text_init_std if _is_text(name) else shape.vision_init_std
            if param.ndim > 1:
                param.normal_(0.0, std, generator=generator)
            elif _is_norm(name) and name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        _fill_padding_rows(model.get_input_embeddings().weight)


def _is_text(name: str) -> bool:
    return name.startswith(("model.language_model.", "lm_head."))


def _is_norm(name: str) -> bool:
    return "norm" in name.rsplit(".", 2)[-2]


def _fill_padding_rows(embedding: torch.Tensor) -> None:
    # Rows past the tokenizer are padding: set them to the mean row, as a resize does,
    # so the tied lm_head never prefers an id the tokenizer cannot decode.
    embedding[TOKENIZER_SIZE:] = embedding[:TOKENIZER_SIZE].mean(dim=0)


def parameter_count(shape: str) -> int:
    """Parameters of a shape (tied embedding counted once), without allocating weights."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(build_config(shape))
    return sum(p.numel() for p in model.parameters())


def generation_config() -> GenerationConfig:
    from transformers import GenerationConfig

    return GenerationConfig(**GENERATION_DEFAULTS)


def build_processor(image_size: int = 768) -> Florence2Processor:
    """The native Florence2Processor: CLIP-style image processor, BART tokenizer, parsing rules."""
    from transformers import CLIPImageProcessorPil, Florence2Processor

    if image_size % PATCH_STRIDE:
        raise ValueError(f"image_size must be a multiple of {PATCH_STRIDE}, got {image_size}")
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
        image_seq_length=(image_size // PATCH_STRIDE) ** 2 + 1,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The native checkpoints' BART tokenizer: the fixture's vocabulary, `<image>` as the image token."""
    from tokenizers import Tokenizer
    from transformers import BartTokenizer

    return BartTokenizer(
        tokenizer_object=Tokenizer.from_str(load_tokenizer_json()),
        extra_special_tokens=florence_special_tokens(),
        image_token=IMAGE_TOKEN,
        model_max_length=1024,
        # transformers 5 ignores this clean-up for BPE tokenizers; False says so without a warning.
        clean_up_tokenization_spaces=False,
    )


def save_model(
    shape: str, out_dir: str | Path, seed: int = 0, image_size: int = 768, loc_scale: float = 1.0
) -> Path:
    """Write a native Florence-2 checkpoint folder with random weights; returns the folder."""
    out = Path(out_dir)
    build_model(shape, seed, loc_scale).save_pretrained(out)
    build_processor(image_size).save_pretrained(out)
    return out


# -- original (remote-code) format: the inverse of export/original.py, for tests -------------------

_ORIGINAL_PROJECTOR = {
    "model.multi_modal_projector.image_projection.weight": "image_projection",
    "model.multi_modal_projector.image_proj_norm.weight": "image_proj_norm.weight",
    "model.multi_modal_projector.image_proj_norm.bias": "image_proj_norm.bias",
    "model.multi_modal_projector.image_position_embed.row_embeddings.weight": (
        "image_pos_embed.row_embeddings.weight"
    ),
    "model.multi_modal_projector.image_position_embed.column_embeddings.weight": (
        "image_pos_embed.column_embeddings.weight"
    ),
    "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed": (
        "visual_temporal_embed.pos_idx_to_embed"
    ),
}
_NATIVE_TIED = (
    "lm_head.weight",
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
)


def original_name(key: str) -> str:
    """The remote-code name of a native state-dict key (the inverse of `original.native_name`)."""
    import re

    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key in _ORIGINAL_PROJECTOR:
        return _ORIGINAL_PROJECTOR[key]
    name = key.removeprefix("model.")
    attention = "window_attn" if ".spatial_block." in name else "channel_attn"
    name = re.sub(r"\.convs\.(\d+)\.conv\.", r".convs.\1.proj.", name)
    name = re.sub(r"\.(conv[12])\.", r".\1.fn.dw.", name)
    name = name.replace(".norm1.", f".{attention}.norm.").replace(".norm2.", ".ffn.norm.")
    name = re.sub(r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2.", name)
    return re.sub(r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1.", name)


def original_config(config: Florence2Config | dict, layout: str = "compact", bad_ids: bool = False) -> dict:
    """config.json as Microsoft's remote-code checkpoints write it.

    "compact": the hand-written ~2.4 kB file of microsoft/Florence-2-*; "full": a transformers 4.x
    dump (~5.4 kB) as fine-tunes save it, with `model_type` "florence2_language" / "davit" and every
    default. `config`: a native Florence2Config or its config.json. `bad_ids`: top-level bos 2 /
    eos 1 / pad 0, as some fine-tunes carry them.
    """
    if layout not in ("compact", "full"):
        raise ValueError(f"Invalid layout {layout!r}, expected one of: compact, full")
    config = config if isinstance(config, dict) else config.to_dict()  # config.json of a native model
    vision, text = config["vision_config"], config["text_config"]
    text_settings = {
        "vocab_size": ORIGINAL_VOCAB_ROWS,
        "activation_function": text["activation_function"],
        "d_model": text["d_model"],
        "encoder_layers": text["encoder_layers"],
        "decoder_layers": text["decoder_layers"],
        "encoder_attention_heads": text["encoder_attention_heads"],
        "decoder_attention_heads": text["decoder_attention_heads"],
        "encoder_ffn_dim": text["encoder_ffn_dim"],
        "decoder_ffn_dim": text["decoder_ffn_dim"],
        "dropout": text["dropout"],
        "attention_dropout": text["attention_dropout"],
        "activation_dropout": text["activation_dropout"],
        "init_std": text["init_std"],
        "max_position_embeddings": text["max_position_embeddings"],
        "scale_embedding": text["scale_embedding"],
        "add_final_layer_norm": False,
        "normalize_before": False,
        **GENERATION_DEFAULTS,  # the original text_config's generation settings and ids
        "is_encoder_decoder": True,
    }
    vision_settings = {
        "model_type": "davit",
        "drop_path_rate": vision["drop_path_rate"],
        "patch_size": list(vision["patch_size"]),
        "patch_stride": list(vision["patch_stride"]),
        "patch_padding": list(vision["patch_padding"]),
        "patch_prenorm": list(vision["patch_prenorm"]),
        "enable_checkpoint": False,
        "dim_embed": list(vision["embed_dim"]),
        "num_heads": list(vision["num_heads"]),
        "num_groups": list(vision["num_groups"]),
        "depths": list(vision["depths"]),
        "window_size": vision["window_size"],
        "projection_dim": vision["projection_dim"],
        "visual_temporal_embedding": {
            "type": "COSINE",
            "max_temporal_embeddings": vision["max_temporal_embeddings"],
        },
        "image_pos_embed": {
            "type": "learned_abs_2d",
            "max_pos_embeddings": vision["max_position_embeddings"],
        },
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }
    if layout == "full":
        defaults = {
            "architectures": None,
            "bad_words_ids": None,
            "chunk_size_feed_forward": 0,
            "diversity_penalty": 0.0,
            "do_sample": False,
            "length_penalty": 1.0,
            "max_length": 20,
            "min_length": 0,
            "num_beam_groups": 1,
            "num_return_sequences": 1,
            "output_attentions": False,
            "repetition_penalty": 1.0,
            "return_dict": True,
            "temperature": 1.0,
            "tie_word_embeddings": True,
            "top_k": 50,
            "top_p": 1.0,
            "torch_dtype": None,
            "use_bfloat16": False,
        }
        text_settings = {**defaults, **text_settings, "model_type": "florence2_language", "use_cache": True}
        vision_settings = {**defaults, **vision_settings, "early_stopping": False, "num_beams": 1}
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0} if bad_ids else TOP_LEVEL_IDS
    return {
        "_name_or_path": "florence2",
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        },
        **ids,
        "ignore_index": -100,
        "model_type": "florence2",
        "projection_dim": vision["projection_dim"],
        "text_config": text_settings,
        "vision_config": vision_settings,
        "vocab_size": ORIGINAL_VOCAB_ROWS,
        "torch_dtype": "float16",
        "transformers_version": "4.41.0.dev0",
        "is_encoder_decoder": True,
    }


ORIGINAL_VOCAB_ROWS = 51289  # BART's 50265 + Florence-2's 1024: no <image> row
TOP_LEVEL_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def plain_bart_tokenizer_json() -> str:
    """The tokenizer.json of Microsoft's checkpoints: BART's, without the Florence tokens."""
    data = json.loads(load_tokenizer_json())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 50265]
    return json.dumps(data, ensure_ascii=False)


def original_preprocessor_config(image_size: int = 768) -> dict:
    """preprocessor_config.json in the remote processor's layout."""
    return {
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_center_crop": False,
        "image_processor_type": "CLIPImageProcessor",
        "image_seq_length": (image_size // PATCH_STRIDE) ** 2 + 1,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "processor_class": "Florence2Processor",
        "resample": 3,
        "size": {"height": image_size, "width": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    }


def native_for_original(model: Florence2ForConditionalGeneration, dtype: str = "float16"):
    """Make a native model exactly representable as an original checkpoint, in place.

    The weights are rounded to `dtype` (Microsoft's files are float16), and the rows past the
    original vocabulary (<image> and padding) are zeroed so that they never win an argmax: the
    native model then generates what the converted one does.
    """
    import torch

    with torch.no_grad():
        if dtype == "float16":
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
        model.get_input_embeddings().weight[ORIGINAL_VOCAB_ROWS:] = 0.0
    return model


def save_original(
    model: Florence2ForConditionalGeneration,
    out_dir: str | Path,
    *,
    layout: str = "compact",
    weights: str = "safetensors",
    bad_ids: bool = False,
    embedding_names: tuple[str, ...] = ("language_model.model.shared.weight",),
    logits_bias: torch.Tensor | None = None,
    image_size: int = 768,
    dtype: str = "float16",
) -> Path:
    """Write `model` (see `native_for_original`) as a Microsoft remote-code checkpoint folder.

    `embedding_names`: which of the tied embedding's four original names the file holds (a
    safetensors file keeps one). `logits_bias`: a fine-tune's non-zero `final_logits_bias`.
    """
    import torch

    if weights not in ("safetensors", "bin"):
        raise ValueError(f"Invalid weights {weights!r}, expected one of: safetensors, bin")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cast = torch.float16 if dtype == "float16" else torch.float32
    state = {}
    table = model.get_input_embeddings().weight.detach()[:ORIGINAL_VOCAB_ROWS]
    for key, value in model.state_dict().items():
        if key in _NATIVE_TIED or key == "model.language_model.shared.weight":
            continue
        value = value.detach()
        if key == "model.multi_modal_projector.image_projection.weight":
            value = value.t()
        state[original_name(key)] = value.to(cast).contiguous()
    for name in embedding_names:
        state[name] = table.to(cast).clone()
    bias = torch.zeros(1, ORIGINAL_VOCAB_ROWS) if logits_bias is None else logits_bias.reshape(1, -1)
    state["language_model.final_logits_bias"] = bias.to(cast)
    last = model.config.vision_config.embed_dim[-1]
    state["vision_tower.norms.weight"] = torch.ones(last, dtype=cast)  # in the original DaViT, unused
    state["vision_tower.norms.bias"] = torch.zeros(last, dtype=cast)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, out / "pytorch_model.bin")
    config = original_config(model.config, layout, bad_ids)
    generation = {"num_beams": 3, "early_stopping": False}
    if bad_ids:
        generation = {**generation, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    files = {
        "config.json": config,
        "generation_config.json": generation,
        "preprocessor_config.json": original_preprocessor_config(image_size),
        "tokenizer_config.json": {"model_max_length": 1024},
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    (out / "tokenizer.json").write_text(plain_bart_tokenizer_json())
    return out
