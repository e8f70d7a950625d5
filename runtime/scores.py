"""Per-box confidence scores, as Florence-2's original `post_process_generation` computes them.

The reference is Microsoft's remote-code processor (processing_florence2.py of the Florence-2
checkpoints), called as its model card shows:

    scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    processor.post_process_generation(sequence=out.sequences[0], transition_beam_score=scores[0], ...)

It drops the first token (the decoder start), decodes every other token on its own to give each a
character span, then for every box of `description_with_bboxes` (<OD>, <DENSE_REGION_CAPTION>)
takes the tokens whose spans overlap the box's four <loc_> tokens and returns
exp(mean of their transition scores). The native `transformers` 5 processor has no scores.
The same rule is applied here to the other answers with boxes (<REGION_PROPOSAL>, phrase
grounding, the boxes of open-vocabulary detection), which the reference leaves unscored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError

_PHRASE_WITH_BOXES = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_BOXES_ONLY = re.compile(r"(?:(?:<loc_\d+>){4,})")
_PHRASE = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")

# post-processing type -> (boxes may come without a phrase, phrases are checked against the banned list)
SCORED_TYPES = {
    "description_with_bboxes": (False, False),
    "bboxes": (True, False),
    "phrase_grounding": (False, True),
    "description_with_bboxes_or_polygons": (False, False),
}


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as the reference's `decode_with_spans` writes it: special tokens literally,
    every other token decoded on its own."""
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    decoder = tokenizer.decoder
    pieces = []
    for i in ids:
        token = tokenizer.id_to_token(int(i))
        if token is None:
            raise InputError(f"token id {i} is not in the vocabulary of {tokenizer.get_vocab_size()} tokens")
        pieces.append(token if token in specials or decoder is None else decoder.decode([token]))
    return pieces


def _span_scores(pieces: list[str], token_scores: Sequence[float], allow_empty: bool, banned) -> list[float]:
    """The reference's `parse_description_with_bboxes_from_text_and_spans` with score_mode
    "avg_loc_scores", reduced to the scores; its quirks are kept (see the comments)."""
    ends = np.cumsum([len(piece) for piece in pieces])
    starts = ends - np.array([len(piece) for piece in pieces], dtype=ends.dtype)
    text = "".join(pieces)
    # reference: spans are offsets into the text with "<s>" etc. still in it; only a leading "<s>"
    # is accounted for, and the offset then advances by each matched phrase only (text between
    # phrases, or a "</s>" inside, shifts later boxes onto other tokens).
    offset = 3 if text.startswith("<s>") else 0
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    pattern = _BOXES_ONLY if allow_empty else _PHRASE_WITH_BOXES
    scores = []
    for phrase_text in pattern.findall(text):
        # reference: its "<ground>" removal is overwritten by the "<obj>" one
        stripped = phrase_text.replace("<obj>", "", 1)
        match = _PHRASE.search(stripped) if stripped or allow_empty else None
        boxes = list(_BOX.finditer(phrase_text))
        if match is None or not boxes or match.group().strip() in banned:
            offset += len(phrase_text)
            continue
        for box in boxes:
            first, last = box.start() + offset, box.end() + offset
            overlapping = np.flatnonzero((ends > first) & (starts < last))
            values = [token_scores[i] for i in overlapping]
            scores.append(math.exp(sum(values) / len(values) if values else 0.0))
        offset += len(phrase_text)
    return scores


def box_scores(
    tokenizer: Tokenizer,
    tokens: Sequence[int],
    token_scores: Sequence[float],
    kind: str,
    banned: frozenset[str] = frozenset(),
) -> list[float] | None:
    """The score of every box the post-processing type `kind` returns, in its order; None for a type
    without boxes. `tokens` runs from the decoder start token, `token_scores` has one value per
    generated token (the reference's transition scores)."""
    if kind not in SCORED_TYPES:
        return None
    generated = list(tokens[1:])
    if len(generated) != len(token_scores):
        raise InputError(f"{len(generated)} generated tokens but {len(token_scores)} token scores")
    pieces = token_pieces(tokenizer, generated)
    if kind == "description_with_bboxes_or_polygons" and "<poly>" in "".join(pieces):
        return []  # polygons only: no boxes
    allow_empty, check_banned = SCORED_TYPES[kind]
    return _span_scores(pieces, [float(v) for v in token_scores], allow_empty, banned if check_banned else ())
