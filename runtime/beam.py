"""Beam search on the merged decoder, with the semantics of `transformers` 5 `_beam_search`.

All beams of all requests run as one decoder call per step. Step 0 runs once per request (its
beams are identical then) and its cross-attention K/V are repeated once per beam; after that only
the self-attention K/V move, and only for a beam that does not continue on its parent's cache
row. A request whose result can no longer change leaves the batch.

The reference, step by step (transformers/generation/utils.py, `_beam_search` and helpers):
- scores are log_softmax(logits), then the logits processors (then the warpers when sampling),
  plus each beam's running score; at step 0 only beam 0 counts (the others start at -1e9);
- the 2 * num_beams best continuations over beams x vocabulary are kept (sampled without
  replacement when `do_sample`), best first;
- those among the first num_beams that end in EOS, or reach max length, are finished hypotheses
  scored sum_logprobs / generated_len ** length_penalty, generated_len counting the new tokens, EOS
  included; the best num_beams finished so far are kept;
- the best num_beams continuations that did not finish are the next running beams;
- a request is done when early_stopping is True and num_beams hypotheses are finished, or when its
  best running beam, normalised at the current length (at max length for early_stopping="never"
  with a positive length_penalty), cannot beat the worst finished hypothesis.
The arithmetic is float32 like the reference's, -1e9 "impossible" scores included. Equal scores
are ranked by index; torch.topk's order for ties is unspecified, and the running beams are kept
in cache-row order rather than best first, so only exact ties could rank differently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import numpy as np

from .decoding import CachedDecoder, CacheLayout, GenerationOptions, Hypothesis, log_softmax, process_logits
from .sampling import generators, resolve_seed, warp

# transformers' score for "cannot be chosen", added rather than assigned: kept for exact parity
FLOOR = np.float32(-1.0e9)


_CHUNK = 256


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, best first; equal values in index order.

    Wide rows (beams x vocabulary) are cut into chunks: the k-th largest chunk maximum bounds the
    k-th largest value from below, so only the few values above it need sorting.
    """
    rows, width = values.shape
    chunks = width // _CHUNK
    if chunks < max(k, 16):
        return np.argsort(-values, axis=1, kind="stable")[:, :k]
    maxima = values[:, : chunks * _CHUNK].reshape(rows, chunks, _CHUNK).max(axis=2)
    if width % _CHUNK:
        maxima = np.concatenate([maxima, values[:, chunks * _CHUNK :].max(axis=1, keepdims=True)], axis=1)
    bounds = -np.partition(-maxima, k - 1, axis=1)[:, k - 1]
    picked = np.empty((rows, k), np.int64)
    for row in range(rows):
        candidates = np.flatnonzero(values[row] >= bounds[row])
        order = np.argsort(-values[row, candidates], kind="stable")[:k]
        picked[row] = candidates[order]
    return picked


def sample_top_k(values: np.ndarray, k: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """k indices per row drawn without replacement from softmax(row), best value first.

    Gumbel top-k: the k largest of value + Gumbel noise are a draw without replacement, the same
    distribution as torch.multinomial(softmax(values), k) in the reference.
    """
    noise = np.stack([rng.gumbel(size=values.shape[1]) for rng in rngs]).astype(np.float32)
    drawn = top_k(values + noise, k)
    order = np.argsort(-np.take_along_axis(values, drawn, axis=1), axis=1, kind="stable")
    return np.take_along_axis(drawn, order, axis=1)


def _take(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """array[i, indices[i, j], ...] for arrays [A, N, ...] and indices [A, M]."""
    return array[np.arange(len(indices))[:, None], indices]


def _rows_by_parent(parents: np.ndarray) -> np.ndarray:
    """For each request, which of its next beams (given best first, by parent row) takes each cache
    row: a beam stays on its parent's row unless a better sibling took it, so only the extra
    children of a parent need a copy of its self-attention K/V, into rows no beam continues."""
    order = np.empty_like(parents)
    for group, row_parents in enumerate(parents.tolist()):
        owner = [-1] * len(row_parents)
        extra = []
        for beam, parent in enumerate(row_parents):
            if owner[parent] < 0:
                owner[parent] = beam
            else:
                extra.append(beam)
        free = (row for row, beam in enumerate(owner) if beam < 0)
        for beam in extra:
            owner[next(free)] = beam
        order[group] = owner
    return order


@dataclass(frozen=True)
class _Beams:
    """Sequences of the active requests, several per request on axis 1: running or finished."""

    tokens: np.ndarray  # int64 [A, N, max_length], pad after `lengths`
    scores: np.ndarray  # float32 [A, N]
    token_scores: np.ndarray  # float32 [A, N, max_new_tokens]
    lengths: np.ndarray  # int64 [A, N], the start token included
    finished: np.ndarray  # bool [A, N]

    def _map(self, function) -> _Beams:
        return _Beams(*(function(getattr(self, f.name)) for f in fields(self)))

    def pick(self, indices: np.ndarray) -> _Beams:
        return self._map(lambda array: _take(array, indices))

    def rows(self, kept: np.ndarray) -> _Beams:
        return self._map(lambda array: array[kept])

    def join(self, other: _Beams) -> _Beams:
        pairs = ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        return _Beams(*(np.concatenate(pair, axis=1) for pair in pairs))

    def hypotheses(self, group: int, count: int) -> list[Hypothesis]:
        return [
            Hypothesis(
                self.tokens[group, j, : self.lengths[group, j]].tolist(),
                self.token_scores[group, j, : self.lengths[group, j] - 1].copy(),
            )
            for j in range(count)
        ]


def _start(batch: int, beams: int, options: GenerationOptions, score: float) -> _Beams:
    tokens = np.full((batch, beams, 1 + options.max_new_tokens), options.pad_token_id, np.int64)
    tokens[:, :, 0] = options.decoder_start_token_id
    return _Beams(
        tokens,
        np.full((batch, beams), score, np.float32),
        np.zeros((batch, beams, options.max_new_tokens), np.float32),
        np.ones((batch, beams), np.int64),
        np.zeros((batch, beams), bool),
    )


def beam_search(
    embed,
    decoder,
    hidden: np.ndarray,
    mask: np.ndarray,
    options: GenerationOptions,
    layout: CacheLayout,
    seed: int | None = None,
    timings: dict | None = None,
) -> list[list[Hypothesis]]:
    """The `num_return_sequences` best hypotheses of every row of the encoder output, best first.

    Each hypothesis carries its tokens' log-probabilities as the reference's
    `compute_transition_scores(sequences, scores, beam_indices)` gives them.
    """
    beams = options.num_beams
    width = 2 * beams  # (1 + number of EOS ids) * num_beams continuations are kept
    max_length = 1 + options.max_new_tokens
    penalty = float(options.length_penalty)
    early = options.early_stopping
    batch = hidden.shape[0]
    rngs = None
    if options.do_sample:
        seed = resolve_seed(seed)
        rngs = [generators(seed, 1)[0] for _ in range(batch)]  # a request draws the same in any batch

    items = np.arange(batch)  # the request of each active group of beams
    running = _start(batch, beams, options, 0.0)
    running.scores[:, 1:] = FLOOR  # only beam 0 is alive at step 0
    finished = _start(batch, beams, options, FLOOR)
    can_improve = np.ones(batch, bool)
    results: list[list[Hypothesis] | None] = [None] * batch

    cache = CachedDecoder(embed, decoder, hidden, mask, layout)
    started = time.perf_counter()
    for step in range(options.max_new_tokens):
        length = step + 1  # tokens of each running beam, the start token included
        active = len(items)
        if step == 0:  # the beams of a request are identical: one decoder row each
            log_probs = log_softmax(cache.step(running.tokens[:, 0, 0]))
            log_probs = process_logits(log_probs, running.tokens[:, 0, :1], options)
        else:
            log_probs = log_softmax(cache.step(running.tokens[:, :, step].reshape(-1)))
            log_probs = process_logits(log_probs, running.tokens[:, :, :length].reshape(-1, length), options)
        if rngs is not None:
            log_probs = warp(log_probs, options, min_tokens_to_keep=2)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(active, -1, vocab)
        totals = (log_probs + running.scores[:, :, None]).reshape(active, beams * vocab)
        if rngs is None:
            chosen = top_k(totals, width)
        else:
            chosen = sample_top_k(totals, width, [rngs[i] for i in items])
        chosen_scores = _take(totals, chosen)
        parents, tokens = np.divmod(chosen, vocab)
        hits = (tokens == options.eos_token_id) | (length + 1 >= max_length)
        candidates = running.pick(parents)
        candidates.tokens[:, :, length] = tokens
        # at step 0 all beams of a request read its one row of log-probs
        sources = parents if log_probs.shape[1] == beams else np.zeros_like(parents)
        token_log_probs = _take(log_probs.reshape(active, -1), sources * vocab + tokens)
        candidates.token_scores[:, :, step] = token_log_probs
        candidates.lengths[:] = length + 1

        # the best continuations that did not finish run on
        alive = chosen_scores + hits.astype(np.float32) * FLOOR
        keep = top_k(alive, beams)
        if step > 0:  # keep beams on their parent's cache row where possible: fewer copies
            keep = _take(keep, _rows_by_parent(_take(parents, keep)))
        running = replace(candidates, scores=alive).pick(keep)
        parents = _take(parents, keep)

        # finished hypotheses join the best so far, if they are better
        just_finished = hits & (np.arange(width) < beams)
        normalised = chosen_scores / np.float32(length**penalty)
        full = finished.finished.all(axis=1) & (early is True)
        normalised = normalised + (full.astype(np.float32) * FLOOR)[:, None]
        normalised = normalised + ((~can_improve).astype(np.float32) * FLOOR)[:, None]
        normalised = normalised + (~just_finished).astype(np.float32) * FLOOR
        merged = finished.join(replace(candidates, scores=normalised, finished=just_finished))
        finished = merged.pick(top_k(merged.scores, beams))

        # can the running beams still beat the worst finished hypothesis?
        hypothetical = max_length - 1 if early == "never" and penalty > 0 else length
        best_running = running.scores.max(axis=1, keepdims=True) / np.float32(hypothetical**penalty)
        worst = np.where(finished.finished, finished.scores.min(axis=1, keepdims=True), FLOOR)
        can_improve &= (best_running > worst).any(axis=1)

        if timings is not None and step == 0:
            timings["first_step"] = time.perf_counter() - started
        done = ~can_improve | (finished.finished.all(axis=1) & (early is True))
        if step == options.max_new_tokens - 1:
            done[:] = True
        for group in np.flatnonzero(done):
            results[items[group]] = finished.hypotheses(group, options.num_return_sequences)
        if done.all():
            break

        kept = ~done
        if step == 0:
            rows = np.repeat(np.arange(active), beams).reshape(active, beams)
        else:
            rows = np.arange(active)[:, None] * beams + parents
        if step > 0 and kept.all():
            cache.reorder(rows.reshape(-1))
        else:
            cache.select(rows[kept].reshape(-1))
        if not kept.all():
            items, can_improve = items[kept], can_improve[kept]
            running, finished = running.rows(kept), finished.rows(kept)
    if timings is not None:
        timings["decode"] = time.perf_counter() - started
        timings["steps"] = step + 1
    return results
