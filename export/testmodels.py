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
# Florence2Processor's parsing rules as the transformers conversion script writes them.
# The pronoun-like phrases (duplicates included) are dropped from phrase grounding.
BANNED_GROUNDING_TOKENS = (
    "it, I, me, mine, you, your, yours, he, him, his, she, her, hers, they, them, their, theirs, "
    "one, oneself, we, us, our, ours, you, your, yours, they, them, their, theirs, mine, yours, his, "
    "hers, its, ours, yours, theirs, myself, yourself, himself, herself, itself, ourselves, "
    "yourselves, themselves, this, that, these, those, who, whom, whose, which, what, who, whom, "
    "whose, which, that, all, another, any, anybody, anyone, anything, each, everybody, everyone, "
    "everything, few, many, nobody, none, one, several, some, somebody, someone, something, "
    "each other, one another, myself, yourself, himself, herself, itself, ourselves, yourselves, "
    "themselves, the image, image, images, the, a, an, a group, other objects, lots, a set"
).split(", ")
POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": (
            r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
            r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
        ),
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": BANNED_GROUNDING_TOKENS},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


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
