"""Sampling: `do_sample=True` with temperature, top-k and top-p, reproducible for a given seed.

The warpers follow `transformers` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in
that order, after the logits processors). The random numbers are numpy's, not torch's, so a seed
gives the same output run after run here, but not the tokens PyTorch draws with that seed.
Each returned sequence draws from its own stream, derived from (seed, its index among the
request's num_return_sequences), so a request samples the same alone or in any batch.
"""

from __future__ import annotations

import numpy as np

from .decoding import (
    NEG_INF,
    CachedDecoder,
    CacheLayout,
    GenerationOptions,
    Hypothesis,
    chosen_log_probs,
    decode_rows,
)
from .errors import InputError


def resolve_seed(seed) -> int:
    """The seed to use: `seed` itself, checked, or fresh entropy when it is None."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def generators(seed: int, count: int) -> list[np.random.Generator]:
    """`count` independent streams; stream k depends only on (seed, k)."""
    return [np.random.default_rng([seed, k]) for k in range(count)]


def warp(scores: np.ndarray, options: GenerationOptions, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Temperature, then top-k, then top-p on scores [R,V] (logits, or log-probs for beam sampling)."""
    if options.temperature != 1.0:
        scores = scores / np.float32(options.temperature)
    vocab = scores.shape[-1]
    if options.top_k:
        k = min(max(options.top_k, min_tokens_to_keep), vocab)
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
        scores = np.where(scores < kth, NEG_INF, scores).astype(np.float32, copy=False)
    if options.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
        ordered = np.take_along_axis(scores, order, axis=-1).astype(np.float64)
        probs = np.exp(ordered - ordered[:, -1:])
        cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
        drop = cumulative <= 1 - options.top_p
        drop[:, -min_tokens_to_keep:] = False
        removed = np.empty_like(drop)
        np.put_along_axis(removed, order, drop, axis=-1)
        scores = np.where(removed, NEG_INF, scores).astype(np.float32, copy=False)
    return scores


def draw(scores: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row from softmax(scores[row]) with that row's generator."""
    shifted = np.exp(scores.astype(np.float64) - scores.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(shifted, axis=-1)
    chosen = np.empty(len(scores), np.int64)
    for row, rng in enumerate(rngs):
        total = cumulative[row, -1]
        chosen[row] = np.searchsorted(cumulative[row], rng.random() * total, side="right")
    return np.minimum(chosen, scores.shape[-1] - 1)


def sample(
    embed,
    decoder,
    hidden: np.ndarray,
    mask: np.ndarray,
    options: GenerationOptions,
    layout: CacheLayout,
    seed: int | None = None,
    scores: bool = False,
    timings: dict | None = None,
) -> list[list[Hypothesis]]:
    """`num_return_sequences` samples for every row of the encoder output.

    With `scores`, each token's log-probability under the distribution it was drawn from (as
    `compute_transition_scores(..., normalize_logits=True)` gives it for generate(do_sample=True)).
    """
    count = options.num_return_sequences
    batch = hidden.shape[0]
    seed = resolve_seed(seed)
    streams = [rng for _ in range(batch) for rng in generators(seed, count)]
    if count > 1:
        hidden, mask = np.repeat(hidden, count, axis=0), np.repeat(mask, count, axis=0)

    def choose(processed: np.ndarray, sequences, active):
        warped = warp(processed, options)
        chosen = draw(warped, [streams[row] for row in active])
        return chosen, chosen_log_probs(warped, chosen) if scores else None

    cache = CachedDecoder(embed, decoder, hidden, mask, layout)
    flat = decode_rows(cache, options, choose, timings)
    return [flat[row * count : (row + 1) * count] for row in range(batch)]
