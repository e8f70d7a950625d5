"""Decoding on the merged decoder with a key/value cache: options, logits processors, greedy search.

The cross-attention K/V are computed once, at the first step, and reused; the self-attention
K/V grow by one position per step. Rows that finish leave the batch, so they stop costing work.
The logits processors follow `transformers` generate, in its order: repetition penalty,
no-repeat n-gram, minimum length, forced BOS, forced EOS. Beam search is in beam.py, sampling in
sampling.py; all three share `CachedDecoder`.
"""

from __future__ import annotations

import math
import time
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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass(frozen=True)
class GenerationOptions:
    """`transformers` generate's settings that Florence-2 uses, with the same defaults and meaning."""

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
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        for name in ("max_new_tokens", "min_length", "min_new_tokens", "no_repeat_ngram_size", "num_beams"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be at least 1, got {self.num_beams}")
        for name in TOKEN_IDS:
            value = getattr(self, name)
            if value is None and name.startswith("forced_"):
                continue
            if not _is_int(value) or value < 0:
                raise InputError(f"{name} must be a non-negative token id, got {value!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InputError(f"do_sample must be true or false, got {self.do_sample!r}")
        self._check_search()
        self._check_sampling()

    def _check_search(self) -> None:
        n = self.num_return_sequences
        if not _is_int(n) or n < 1:
            raise InputError(f"num_return_sequences must be a positive integer, got {n!r}")
        if self.num_beams > 1 and n > self.num_beams:
            raise InputError(f"num_return_sequences ({n}) must be at most num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and n > 1:
            raise InputError(
                f"num_return_sequences={n} needs num_beams >= {n} or do_sample=True: "
                "greedy decoding finds one sequence"
            )
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise InputError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InputError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}')
        penalty = self.repetition_penalty
        if not _is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
            raise InputError(f"repetition_penalty must be a positive number, got {penalty!r}")

    def _check_sampling(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(
                f"top_k must be a non-negative integer (0 keeps every token), got {self.top_k!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")

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


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `tokens` (transformers' NoRepeatNGram)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def _ban_repeated_ngrams(logits: np.ndarray, tokens: np.ndarray, n: int) -> None:
    """`banned_ngram_tokens` for every row at once: rows share one length."""
    length = tokens.shape[1]
    starts = length - n + 1  # n-grams that start before `starts` are complete
    if starts < 1:
        return
    matches = np.ones((tokens.shape[0], starts), bool)
    for offset in range(n - 1):  # the n-gram's first n-1 tokens equal the last n-1 tokens
        matches &= tokens[:, offset : offset + starts] == tokens[:, starts + offset, None]
    rows, found = np.nonzero(matches)
    logits[rows, tokens[rows, found + n - 1]] = NEG_INF


def process_logits(logits: np.ndarray, sequences, options: GenerationOptions) -> np.ndarray:
    """Apply the logits processors, in place, to next-token scores [R,V] of rows whose tokens so far
    are `sequences` (R lists or an [R,L] array, all of one length). Beam search passes log-probs."""
    length = len(sequences[0])
    penalty = options.repetition_penalty
    if penalty != 1.0 or options.no_repeat_ngram_size:
        tokens = np.asarray(sequences, dtype=np.int64)
        if penalty != 1.0:
            # reference: a token seen before, the decoder start token included, is penalised once
            seen = np.take_along_axis(logits, tokens, axis=1)
            seen = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
            np.put_along_axis(logits, tokens, seen.astype(logits.dtype, copy=False), axis=1)
        if options.no_repeat_ngram_size:
            _ban_repeated_ngrams(logits, tokens, options.no_repeat_ngram_size)
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


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in the scores' precision (float32, like torch)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted


def chosen_log_probs(scores: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """log_softmax(scores)[row, chosen[row]] without materialising the whole log_softmax."""
    top = scores.max(axis=-1, keepdims=True)
    total = np.log(np.exp(scores - top).sum(axis=-1))
    return (np.take_along_axis(scores, chosen[:, None], axis=1)[:, 0] - top[:, 0]) - total


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


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence: tokens from the decoder start token to EOS, and the log-probability of
    each generated token (what `compute_transition_scores` gives: `token_scores[i]` is for
    `tokens[i + 1]`)."""

    tokens: list[int]
    token_scores: np.ndarray | None = None


class CachedDecoder:
    """The merged decoder with its key/value cache, one row per sequence being extended.

    Step 0 runs the no-past branch on the encoder output and keeps the cross-attention K/V it
    returns; later steps run the with-past branch and grow the self-attention K/V. `select` keeps,
    repeats or reorders rows of every per-row tensor; `reorder` moves only the self-attention K/V,
    for beams of one request, which share their cross-attention K/V and mask.
    """

    def __init__(self, embed, decoder, hidden: np.ndarray, mask: np.ndarray, layout: CacheLayout):
        self._embed = embed
        self._decoder = decoder
        self._outputs = [output.name for output in decoder.get_outputs()]
        self._names = layout.past_names()
        self._self_names = [name for name in self._names if ".decoder." in name]
        batch = hidden.shape[0]
        self.past = {
            name: np.zeros((batch, layout.heads, 0, layout.head_dim), np.float32) for name in self._names
        }
        self.hidden = hidden
        self.mask = mask
        self.steps = 0

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Next-token logits [R,V] after each row's last token `tokens` [R]."""
        feed = {
            "inputs_embeds": self._embed.run(None, {"input_ids": tokens.reshape(-1, 1).astype(np.int64)})[0],
            "encoder_attention_mask": self.mask,
            "encoder_hidden_states": self.hidden,
            "use_cache_branch": np.array([self.steps > 0]),
            **self.past,
        }
        result = dict(zip(self._outputs, self._decoder.run(self._outputs, feed)))
        # later steps return empty constants for the encoder presents: keep the step-0 ones
        names = self._names if self.steps == 0 else self._self_names
        for name in names:
            self.past[name] = result[name.replace("past_key_values", "present")]
        if self.steps == 0:
            self.hidden = self.hidden[:, :0]  # from now on only its (empty) shape is fed
        self.steps += 1
        return result["logits"][:, -1, :]

    def select(self, rows: np.ndarray) -> None:
        """Keep rows `rows` (indices into the current rows; repeats allowed) of every per-row tensor."""
        self.past = {name: value[rows] for name, value in self.past.items()}
        self.mask = self.mask[rows]
        self.hidden = self.hidden[rows]

    def reorder(self, rows: np.ndarray) -> None:
        """Self-attention K/V of rows `rows`; the rows' cross-attention K/V and mask stay as they are.

        Rows are moved in place: beams that keep their parent cost nothing, and nothing is allocated.
        """
        moved = np.flatnonzero(rows != np.arange(self.rows))
        if not len(moved):
            return
        sources = rows[moved]
        overwritten = set(moved.tolist())
        for name in self._self_names:
            past = self.past[name]
            saved = {int(s): past[s].copy() for s in np.unique(sources) if int(s) in overwritten}
            for row, source in zip(moved, sources.tolist()):
                past[row] = saved[source] if source in saved else past[source]


def decode_rows(
    cache: CachedDecoder, options: GenerationOptions, choose, timings: dict | None
) -> list[Hypothesis]:
    """Extend every row of `cache` until EOS or max_new_tokens; `choose(scores, sequences, active)`
    returns the next token of each active row and, or None, their log-probabilities."""
    batch = cache.rows
    sequences = [[options.decoder_start_token_id] for _ in range(batch)]
    scored: list[list[float]] = [[] for _ in range(batch)]
    active = np.arange(batch)
    with_scores = False
    started = time.perf_counter()
    for step in range(options.max_new_tokens):
        last = np.array([sequences[row][-1] for row in active], np.int64)
        logits = cache.step(last)
        rows = [sequences[row] for row in active]
        chosen, log_probs = choose(process_logits(logits.copy(), rows, options), rows, active)
        for row, token in zip(rows, chosen):
            row.append(int(token))
        if log_probs is not None:
            with_scores = True
            for row, value in zip(active, log_probs):
                scored[row].append(float(value))
        if timings is not None and step == 0:
            timings["first_step"] = time.perf_counter() - started
        keep = chosen != options.eos_token_id
        if not keep.all():
            active = active[keep]
            if not len(active):
                break
            cache.select(np.flatnonzero(keep))
    if timings is not None:
        timings["decode"] = time.perf_counter() - started
        timings["steps"] = step + 1
    return [
        Hypothesis(tokens, np.array(values, np.float32) if with_scores else None)
        for tokens, values in zip(sequences, scored)
    ]


def greedy_search(
    embed,
    decoder,
    hidden: np.ndarray,
    mask: np.ndarray,
    options: GenerationOptions,
    layout: CacheLayout,
    scores: bool = False,
    timings: dict | None = None,
) -> list[Hypothesis]:
    """The most likely next token at each step, for every row of the encoder output.

    With `scores`, each token's log-probability under the processed logits, as
    `compute_transition_scores(..., normalize_logits=True)` gives it for generate(num_beams=1).
    """

    def choose(processed: np.ndarray, sequences, active):
        chosen = processed.argmax(axis=-1)
        return chosen, chosen_log_probs(processed, chosen) if scores else None

    return decode_rows(CachedDecoder(embed, decoder, hidden, mask, layout), options, choose, timings)


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
    hypotheses = greedy_search(embed, decoder, hidden, mask, options, layout, timings=timings)
    return [hypothesis.tokens for hypothesis in hypotheses]
