"""Greedy decoding on the merged decoder with a key/value cache.

The cross-attention K/V are computed once, at the first step, and reused; the self-attention
K/V grow by one position per step. Rows that finish leave the batch, so they stop costing work.
The logits processors follow `transformers` generate, in its order: no-repeat n-gram, minimum
length, forced BOS, forced EOS.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import InputError

NEG_INF = -np.inf
TOKEN_IDS = (
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)
# transformers falls back to max_length=20 when a checkpoint sets no length; the model card asks
# for max_new_tokens=1024, which is what users mean, so that is the default here.
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_length: int = 0
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    do_sample: bool = False
    decoder_start_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2

    def __post_init__(self):
        for name in ("max_new_tokens", "min_length", "min_new_tokens", "no_repeat_ngram_size", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for name in TOKEN_IDS:
            value = getattr(self, name)
            if value is None and name.startswith("forced_"):
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name} must be a non-negative token id, got {value!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InputError(f"do_sample must be true or false, got {self.do_sample!r}")

    @classmethod
    def from_config(cls, config: dict, max_positions: int, **overrides) -> GenerationOptions:
        """Options from generation_config.json; per-call `overrides` (not None) win."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        max_length = config.get("max_length")
        if "max_new_tokens" not in values and max_length is not None:
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
                raise InputError(
                    "max_length must be an integer of at least 2 (the start token and one new token), "
                    f"got {max_length!r}"
                )
            values["max_new_tokens"] = max_length - 1
        values.update({k: v for k, v in overrides.items() if v is not None})
        eos = values.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise InputError("eos_token_id is an empty list")
            values["eos_token_id"] = eos[0]
        unknown = set(values) - known
        if unknown:
            raise InputError(
                f"unknown generation option {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}"
            )
        options = cls(**values)
        limit = max_positions - 1
        if options.max_new_tokens > limit:
            if "max_new_tokens" in overrides and overrides["max_new_tokens"] is not None:
                raise InputError(
                    f"max_new_tokens {options.max_new_tokens} is too large: "
                    f"the decoder has {max_positions} positions, "
                    f"so at most {limit} new tokens"
                )
            options = replace(options, max_new_tokens=limit)
        return options

    def greedy(self) -> GenerationOptions:
        """These options for the greedy decoder, warning once when the config asked for more."""
        if self.num_beams > 1 or self.do_sample:
            asked = f"num_beams={self.num_beams}" if self.num_beams > 1 else "do_sample=True"
            warnings.warn(
                f"generation_config asks for {asked}; flonnx does not implement it yet and decodes greedily "
                "(num_beams=1), so results can differ from transformers with the same settings",
                UserWarning,
                stacklevel=3,
            )
        return replace(self, num_beams=1, do_sample=False)


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `tokens` (transformers' NoRepeatNGram)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def process_logits(logits: np.ndarray, sequences: list[list[int]], options: GenerationOptions) -> np.ndarray:
    """Apply the logits processors to next-token logits [B,V] of rows whose tokens are `sequences`."""
    length = len(sequences[0])
    if options.no_repeat_ngram_size:
        for row, tokens in enumerate(sequences):
            banned = banned_ngram_tokens(tokens, options.no_repeat_ngram_size)
            if banned:
                logits[row, banned] = NEG_INF
    # generate replaces min_length by min_new_tokens + the decoder prompt (1) when min_new_tokens is set
    min_length = options.min_new_tokens + 1 if options.min_new_tokens else options.min_length
    if length < min_length:
        logits[:, options.eos_token_id] = NEG_INF
    if options.forced_bos_token_id is not None and length == 1:
        logits[:] = NEG_INF
        logits[:, options.forced_bos_token_id] = 0
    if options.forced_eos_token_id is not None and length == options.max_new_tokens:
        logits[:] = NEG_INF
        logits[:, options.forced_eos_token_id] = 0
    return logits


@dataclass(frozen=True)
class CacheLayout:
    """Names and shapes of the merged decoder's cache tensors, read from the manifest."""

    layers: int
    heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        return [
            f"past_key_values.{i}.{kind}.{kv}"
            for i in range(self.layers)
            for kind in ("decoder", "encoder")
            for kv in ("key", "value")
        ]


def greedy_decode(
    embed,
    decoder,
    hidden: np.ndarray,
    mask: np.ndarray,
    options: GenerationOptions,
    layout: CacheLayout,
    timings: dict | None = None,
) -> list[list[int]]:
    """Decode every row of the encoder output; returns each row's tokens from the start token to EOS."""
    import time

    batch = hidden.shape[0]
    sequences = [[options.decoder_start_token_id] for _ in range(batch)]
    active = np.arange(batch)
    names = layout.past_names()
    past = {name: np.zeros((batch, layout.heads, 0, layout.head_dim), np.float32) for name in names}
    outputs = [output.name for output in decoder.get_outputs()]
    empty_hidden = hidden[:, :0]
    started = time.perf_counter()
    for step in range(options.max_new_tokens):
        last = np.array([[sequences[row][-1]] for row in active], np.int64)
        feed = {
            "inputs_embeds": embed.run(None, {"input_ids": last})[0],
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden if step == 0 else empty_hidden,
            "use_cache_branch": np.array([step > 0]),
            **past,
        }
        result = dict(zip(outputs, decoder.run(outputs, feed)))
        rows = [sequences[row] for row in active]
        logits = process_logits(result["logits"][:, -1, :].copy(), rows, options)
        chosen = logits.argmax(axis=-1)
        for row, token in zip(rows, chosen):
            row.append(int(token))
        for name in names:
            if step == 0 or ".decoder." in name:
                past[name] = result[name.replace("past_key_values", "present")]
        if timings is not None and step == 0:
            timings["first_step"] = time.perf_counter() - started
        keep = chosen != options.eos_token_id
        if not keep.all():
            active = active[keep]
            if not len(active):
                break
            past = {name: value[keep] for name, value in past.items()}
            mask = mask[keep]
            empty_hidden = empty_hidden[keep]
    if timings is not None:
        timings["decode"] = time.perf_counter() - started
        timings["steps"] = step + 1
    return sequences
