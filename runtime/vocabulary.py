"""Florence-2's tokenizer: BART's byte-level BPE plus the task and location tokens.

Native checkpoints (and flonnx exports) carry the Florence tokens in `tokenizer.json`. Microsoft's
original checkpoints, and the onnx-community folders made from them, ship BART's plain
`tokenizer.json` (50265 entries): the remote `Florence2Processor` adds the 1024 Florence tokens at
load time, as additional special tokens, in the fixed order below, so `<od>` is 50265 and
`<loc_0>` is 50269. `load_tokenizer` does the same and checks that every id lands where the model's
embedding expects it.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer

from .errors import ModelFolderError

# Florence-2's added tokens in id order from 50265; "desciption" is the original spelling.
FLORENCE_TOKENS: tuple[str, ...] = (
    "<od>",
    "</od>",
    "<ocr>",
    "</ocr>",
    *(f"<loc_{i}>" for i in range(1000)),
    *"<cap> </cap> <ncap> </ncap> <dcap> </dcap> <grounding> </grounding> <seg> </seg> <sep>".split(),
    *"<region_cap> </region_cap> <region_to_desciption> </region_to_desciption>".split(),
    *"<proposal> </proposal> <poly> </poly> <and>".split(),
)
FIRST_FLORENCE_ID = 50265  # BART's vocabulary ends at 50264 (<mask>)
ORIGINAL_VOCAB_SIZE = FIRST_FLORENCE_ID + len(FLORENCE_TOKENS)  # 51289 rows in the original checkpoints


def add_florence_tokens(tokenizer: Tokenizer, source: str = "tokenizer.json") -> bool:
    """Add the Florence tokens to a plain BART tokenizer in place, as the original processor does.

    Returns True when they were added, False when `tokenizer` already had them. Raises
    ModelFolderError when the tokenizer is neither, or when an id would not be the model's.
    """
    if tokenizer.token_to_id(FLORENCE_TOKENS[0]) is None:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != FIRST_FLORENCE_ID:
            raise ModelFolderError(
                f"{source} has {size} tokens and no Florence-2 task tokens; expected BART's "
                f"{FIRST_FLORENCE_ID} (to which Florence-2 adds <od>, <loc_0>..<loc_999>, ...)"
            )
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FLORENCE_TOKENS])
        added = True
    else:
        added = False
    for offset, token in enumerate(FLORENCE_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != FIRST_FLORENCE_ID + offset:
            raise ModelFolderError(
                f"{source}: {token} has id {found}; Florence-2 expects {FIRST_FLORENCE_ID + offset}"
            )
    return added


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A folder's `tokenizer.json`, with the Florence tokens added where it is plain BART."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing") from None
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise ModelFolderError(f"cannot read {path}: {error}") from None
    add_florence_tokens(tokenizer, str(path))
    return tokenizer
