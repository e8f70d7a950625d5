"""Decoding: logits processors against transformers, generation options, and the cached greedy loop
on a fake merged decoder that checks every feed it receives."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flonnx.runtime.decoding import (
    DEFAULT_MAX_NEW_TOKENS,
    CacheLayout,
    GenerationOptions,
    banned_ngram_tokens,
    greedy_decode,
    process_logits,
)
from flonnx.runtime.errors import InputError

FAST = settings(max_examples=200, deadline=None)
DECODE = settings(max_examples=40, deadline=None)
EOS = 2
START = 2
INT_OPTIONS = ("max_new_tokens", "min_length", "min_new_tokens", "no_repeat_ngram_size", "num_beams")


# -- transformers as the reference -------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


class _StubModel:
    """Just enough of a model for GenerationMixin's processor and length helpers."""

    config = SimpleNamespace(is_encoder_decoder=True)

    def _merge_criteria_processor_list(self, default, custom):
        from transformers.generation.utils import GenerationMixin

        return GenerationMixin._merge_criteria_processor_list(self, default, custom)


def hf_config(options: GenerationOptions, **changes):
    """The GenerationConfig generate would hold for these options (an encoder-decoder: prompt = 1 token)."""
    torch = _torch()
    transformers = pytest.importorskip("transformers")
    values = {
        "max_length": 1 + options.max_new_tokens,
        "min_length": options.min_length,
        "min_new_tokens": options.min_new_tokens,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
        "forced_bos_token_id": options.forced_bos_token_id,
        "forced_eos_token_id": options.forced_eos_token_id,
        "eos_token_id": options.eos_token_id,
        "pad_token_id": options.pad_token_id,
        "decoder_start_token_id": options.decoder_start_token_id,
    }
    config = transformers.GenerationConfig(**{**values, **changes})
    config._eos_token_tensor = torch.tensor([options.eos_token_id])
    return config


def hf_processors(config):
    """transformers' own processor list, in its own order (GenerationMixin._get_logits_processor)."""
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.utils import GenerationMixin

    processors = GenerationMixin._get_logits_processor(
        _StubModel(),
        generation_config=config,
        input_ids_seq_length=1,
        logits_processor=LogitsProcessorList(),
        device="cpu",
    )
    expected = {
        "NoRepeatNGramLogitsProcessor",
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
    }
    assert {type(p).__name__ for p in processors} <= expected, processors
    return processors


def hf_process(logits: np.ndarray, sequences: list[list[int]], processors) -> np.ndarray:
    torch = _torch()
    scores = torch.from_numpy(logits.copy())
    input_ids = torch.tensor(sequences, dtype=torch.long)
    return processors(input_ids, scores).numpy()


def assert_same_scores(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same masked positions (-inf or finfo.min), same argmax, and identical values elsewhere."""
    floor = np.finfo(np.float32).min
    masked, masked_hf = actual <= floor, expected <= floor
    np.testing.assert_array_equal(masked, masked_hf)
    np.testing.assert_array_equal(actual[~masked], expected[~masked_hf])
    np.testing.assert_array_equal(actual.argmax(-1), _torch().from_numpy(expected).argmax(-1).numpy())


# -- n-grams and logits processors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "n", "banned"),
    [
        ([1, 2, 3, 1, 2], 3, [3]),
        ([1, 2, 3, 1, 2], 2, [3]),
        ([1, 2, 3, 1, 2], 1, [1, 2, 3, 1, 2]),
        ([1, 2, 3, 1, 2], 0, []),
        ([1, 2, 1, 2, 1, 2], 2, [1, 1]),
        ([1, 2], 3, []),
        ([4, 4, 4], 2, [4, 4]),
    ],
)
def test_banned_ngram_tokens_examples(tokens, n, banned):
    assert banned_ngram_tokens(tokens, n) == banned


@FAST
@given(st.lists(st.integers(0, 4), max_size=12), st.integers(1, 4))
def test_banned_ngram_tokens_are_exactly_the_repeating_ones(tokens, n):
    """A token is banned iff appending it creates an n-gram that already occurs."""
    banned = set(banned_ngram_tokens(tokens, n))
    old = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    for token in range(5):
        extended = tokens + [token]
        assert (token in banned) == (len(extended) >= n and tuple(extended[-n:]) in old)


def min_lengths(min_new_tokens: int, most: int):
    """min_length values for which transformers' processors and generate agree: when both are set,
    generate keeps only min_new_tokens (test_min_length_and_min_new_tokens_as_generate_prepares_them)."""
    return st.integers(0, min_new_tokens + 1 if min_new_tokens else most)


@st.composite
def processor_cases(draw):
    vocab = draw(st.integers(5, 20))
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    token = st.integers(0, vocab - 1)
    sequences = [draw(st.lists(token, min_size=length, max_size=length)) for _ in range(batch)]
    min_new_tokens = draw(st.integers(0, 12))
    options = GenerationOptions(
        max_new_tokens=draw(st.integers(1, 12)),
        min_length=draw(min_lengths(min_new_tokens, 12)),
        min_new_tokens=min_new_tokens,
        no_repeat_ngram_size=draw(st.integers(0, 4)),
        forced_bos_token_id=draw(st.none() | token),
        forced_eos_token_id=draw(st.none() | token),
    )
    # Small integer logits make ties, so the argmax tie-break is exercised too.
    integral = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.integers(-3, 4, (batch, vocab)) if integral else rng.standard_normal((batch, vocab))
    return logits.astype(np.float32), sequences, options


@FAST
@given(processor_cases())
def test_process_logits_matches_transformers_processors(case):
    logits, sequences, options = case
    expected = hf_process(logits, sequences, hf_processors(hf_config(options)))
    actual = process_logits(logits.copy(), sequences, options)
    assert actual.shape == logits.shape and actual.dtype == logits.dtype
    assert_same_scores(actual, expected)


def test_process_logits_forced_eos_wins_over_min_length():
    """HF order: min-length masks EOS first, then forced EOS forces it at the last position."""
    options = GenerationOptions(max_new_tokens=3, min_length=10, min_new_tokens=10, forced_eos_token_id=EOS)
    logits = np.arange(8, dtype=np.float32)[None]
    processed = process_logits(logits.copy(), [[START, 5, 6]], options)
    assert processed.argmax() == EOS and np.isneginf(np.delete(processed[0], EOS)).all()
    before = process_logits(logits.copy(), [[START, 5]], options)
    assert np.isneginf(before[0, EOS]) and before.argmax() == 7


@pytest.mark.parametrize(("min_length", "min_new_tokens"), [(6, 1), (9, 4), (0, 3), (4, 0), (3, 2)])
def test_min_length_and_min_new_tokens_as_generate_prepares_them(min_length, min_new_tokens):
    """generate rewrites min_length = min_new_tokens + prompt length when min_new_tokens is set
    (GenerationMixin._prepare_generated_length: "`min_new_tokens` will take precedence"), so a
    larger min_length then no longer applies. process_logits applies both: (6, 1) and (9, 4) fail."""
    from transformers.generation.utils import GenerationMixin

    torch = _torch()
    options = GenerationOptions(
        min_length=min_length, min_new_tokens=min_new_tokens, forced_eos_token_id=None
    )
    config = GenerationMixin._prepare_generated_length(
        _StubModel(),
        hf_config(options, min_new_tokens=min_new_tokens or None),  # flonnx's 0 = transformers' None
        has_default_max_length=False,
        has_default_min_length=False,
        model_input_name="input_ids",
        input_ids_length=1,
        inputs_tensor=torch.zeros((1, 4), dtype=torch.long),
    )
    processors = hf_processors(config)
    logits = np.zeros((1, 8), np.float32)
    logits[0, EOS] = 1.0
    for length in range(1, 12):
        sequences = [[START] + [5] * (length - 1)]
        assert_same_scores(
            process_logits(logits.copy(), sequences, options), hf_process(logits, sequences, processors)
        )


# -- GenerationOptions ---------------------------------------------------------------------------


FLORENCE_CONFIG = {
    "num_beams": 3,
    "no_repeat_ngram_size": 3,
    "min_length": 2,
    "max_length": 20,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "eos_token_id": [2, 7],
    "bos_token_id": 0,
    "pad_token_id": 1,
    "decoder_start_token_id": 2,
    "early_stopping": True,
    "transformers_version": "4.38.0",
}


def test_from_config_reads_generation_config():
    options = GenerationOptions.from_config(FLORENCE_CONFIG, 1024)
    assert options == GenerationOptions(
        max_new_tokens=19,
        min_length=2,
        no_repeat_ngram_size=3,
        num_beams=3,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        early_stopping=True,
    )


def test_from_config_does_not_change_the_config():
    config = dict(FLORENCE_CONFIG)
    GenerationOptions.from_config(config, 1024, num_beams=1, max_new_tokens=5)
    assert config == FLORENCE_CONFIG


def test_from_config_defaults():
    options = GenerationOptions.from_config({}, 4096)
    assert options == GenerationOptions()
    assert options.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_from_config_takes_a_transformers_generation_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GenerationConfig(
        num_beams=3, no_repeat_ngram_size=3, forced_eos_token_id=2, eos_token_id=2
    )
    options = GenerationOptions.from_config(config.to_dict(), 1024, max_new_tokens=24)
    assert (options.num_beams, options.no_repeat_ngram_size, options.max_new_tokens) == (3, 3, 24)
    assert options.forced_bos_token_id is None and options.forced_eos_token_id == 2


def test_from_config_max_new_tokens_wins_over_max_length():
    options = GenerationOptions.from_config({"max_length": 20, "max_new_tokens": 7}, 1024)
    assert options.max_new_tokens == 7
    assert GenerationOptions.from_config({"max_length": 20}, 1024, max_new_tokens=5).max_new_tokens == 5


def test_from_config_overrides_win_and_none_is_ignored():
    config = {"num_beams": 3, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0}
    options = GenerationOptions.from_config(config, 1024, num_beams=1, no_repeat_ngram_size=0, min_length=4)
    assert (options.num_beams, options.no_repeat_ngram_size, options.min_length) == (1, 0, 4)
    assert options.forced_bos_token_id == 0
    kept = GenerationOptions.from_config(
        config, 1024, num_beams=None, max_new_tokens=None, forced_bos_token_id=None
    )
    assert kept == GenerationOptions.from_config(config, 1024)
    assert kept.num_beams == 3 and kept.forced_bos_token_id == 0


def test_from_config_eos_list_takes_the_first():
    assert GenerationOptions.from_config({"eos_token_id": [5, 2]}, 1024).eos_token_id == 5
    assert GenerationOptions.from_config({"eos_token_id": 2}, 1024).eos_token_id == 2


@pytest.mark.parametrize("config", [{}, {"max_length": 4096}, {"max_new_tokens": 2000}, {"max_length": 64}])
def test_from_config_clamps_a_config_length_to_the_decoder_positions(config):
    assert GenerationOptions.from_config(config, 64).max_new_tokens == 63


def test_from_config_rejects_an_explicit_length_beyond_the_decoder_positions():
    assert GenerationOptions.from_config({}, 64, max_new_tokens=63).max_new_tokens == 63
    with pytest.raises(InputError, match="max_new_tokens") as error:
        GenerationOptions.from_config({"max_length": 20}, 64, max_new_tokens=64)
    assert "63" in str(error.value)


@pytest.mark.parametrize("name", INT_OPTIONS)
@pytest.mark.parametrize("value", [-1, True, False, 2.5, "3", [3]])
def test_invalid_integer_options_name_the_option(name, value):
    with pytest.raises(InputError, match=name):
        GenerationOptions.from_config({}, 1024, **{name: value})
    with pytest.raises(InputError, match=name):
        GenerationOptions.from_config({name: value}, 1024)


def test_zero_max_new_tokens_is_rejected():
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerationOptions.from_config({}, 1024, max_new_tokens=0)
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)
    assert GenerationOptions.from_config({}, 1024, max_new_tokens=np.int64(3)).max_new_tokens == 3


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("eos_token_id", -1),
        ("eos_token_id", "2"),
        ("eos_token_id", []),
        ("forced_bos_token_id", -1),
        ("forced_eos_token_id", True),
        ("decoder_start_token_id", 1.5),
        ("do_sample", "no"),
    ],
)
def test_invalid_token_ids_and_flags_name_the_option(name, value):
    """A negative id would index logits from the end and mask or force the wrong token silently."""
    with pytest.raises(InputError, match=name):
        GenerationOptions.from_config({name: value}, 1024)


@pytest.mark.parametrize("value", [0, -5, True, "abc", 2.5])
def test_invalid_max_length_in_the_config_names_it(value):
    """max_length <= 1 leaves no new token; today -5 and True quietly become 1 and "abc" escapes as a
    bare ValueError from int()."""
    with pytest.raises(InputError, match="max_length"):
        GenerationOptions.from_config({"max_length": value}, 1024)


def test_unknown_overrides_list_the_valid_options():
    with pytest.raises(InputError) as error:
        GenerationOptions.from_config({}, 1024, beams=3, temperature=0.5)
    message = str(error.value)
    assert "beams" in message and "temperature" in message
    for field in fields(GenerationOptions):
        assert field.name in message


def test_unknown_config_keys_are_ignored():
    options = GenerationOptions.from_config(
        {"output_scores": True, "use_cache": True, "typical_p": 0.9}, 1024
    )
    assert options == GenerationOptions.from_config({}, 1024)


def test_options_are_frozen():
    with pytest.raises(FrozenInstanceError):
        GenerationOptions().num_beams = 3


def test_cache_layout_names():
    assert CacheLayout(layers=2, heads=4, head_dim=8).past_names() == [
        "past_key_values.0.decoder.key",
        "past_key_values.0.decoder.value",
        "past_key_values.0.encoder.key",
        "past_key_values.0.encoder.value",
        "past_key_values.1.decoder.key",
        "past_key_values.1.decoder.value",
        "past_key_values.1.encoder.key",
        "past_key_values.1.encoder.value",
    ]


# -- greedy_decode on a fake merged decoder -------------------------------------------------------

LAYOUT = CacheLayout(layers=2, heads=2, head_dim=3)
MODEL_DIM = 4
ENCODER_LENGTH = 6


def toy_logits(seed: int, token: int, step: int, vocab: int, eos_bias: float, ramp: float) -> np.ndarray:
    """Next-token logits of a row that depend on its identity, its last token and the past length."""
    logits = np.random.default_rng([seed, token, step]).standard_normal(vocab).astype(np.float32)
    logits[EOS] += eos_bias + ramp * step
    return logits


def encoder_inputs(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states that carry each row's seed, and a mask whose length also identifies the row."""
    n, d = np.arange(ENCODER_LENGTH)[:, None], np.arange(MODEL_DIM)[None, :]
    hidden = np.stack([seed + n / 100 + d / 1000 for seed in seeds]).astype(np.float32)
    mask = np.zeros((len(seeds), ENCODER_LENGTH), np.int64)
    for row, seed in enumerate(seeds):
        mask[row, : 1 + seed % ENCODER_LENGTH] = 1
    return hidden, mask


class FakeEmbed:
    def __init__(self):
        self.batches: list[int] = []

    def get_outputs(self):
        return [SimpleNamespace(name="inputs_embeds")]

    def run(self, names, feed):
        assert set(feed) == {"input_ids"}
        ids = feed["input_ids"]
        assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[1] == 1
        self.batches.append(ids.shape[0])
        return [np.repeat(ids[..., None].astype(np.float32), MODEL_DIM, axis=-1)]


class FakeDecoder:
    """A merged decoder in numpy that asserts the cache protocol of DESIGN.md section 3."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.step = 0
        self.batches: list[int] = []
        self.fed: dict[int, list[int]] = {}  # seed -> tokens fed so far
        self.encoder_present: dict[int, dict[str, np.ndarray]] = {}
        self.past_names = LAYOUT.past_names()
        self.inputs = {"inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}
        self.inputs |= set(self.past_names)
        presents = [name.replace("past_key_values", "present") for name in self.past_names]
        self.output_names = presents[::2] + ["logits"] + presents[1::2]  # not the usual order on purpose

    def get_outputs(self):
        return [SimpleNamespace(name=name) for name in self.output_names]

    @staticmethod
    def offset(name: str) -> float:
        layer = int(name.split(".")[1])
        return 1000 * layer + (500 if name.endswith("value") else 0) + (250 if ".encoder." in name else 0)

    def run(self, names, feed):
        assert set(feed) == self.inputs
        embeds, mask = feed["inputs_embeds"], feed["encoder_attention_mask"]
        batch = embeds.shape[0]
        tokens = embeds[:, 0, 0].astype(np.int64)
        use_cache = feed["use_cache_branch"]
        assert use_cache.dtype == np.bool_ and use_cache.shape == (1,)
        assert mask.shape == (batch, ENCODER_LENGTH) and feed["encoder_hidden_states"].shape[0] == batch
        for name in self.past_names:
            shape = feed[name].shape
            assert (shape[0], shape[1], shape[3]) == (batch, LAYOUT.heads, LAYOUT.head_dim), (name, shape)
        if self.step == 0:
            assert not use_cache[0]
            assert all(feed[name].shape[2] == 0 for name in self.past_names)
            hidden = feed["encoder_hidden_states"]
            assert hidden.shape == (batch, ENCODER_LENGTH, MODEL_DIM)
            seeds = [int(round(h)) for h in hidden[:, 0, 0]]
            for row, seed in enumerate(seeds):
                kv = np.broadcast_to(
                    hidden[row, None, :, : LAYOUT.head_dim], (LAYOUT.heads, ENCODER_LENGTH, 3)
                )
                self.encoder_present[seed] = {
                    name: kv + self.offset(name) for name in self.past_names if ".encoder." in name
                }
        else:
            assert use_cache[0]
            first = self.past_names[2]
            seeds = [int(round(v - self.offset(first))) for v in feed[first][:, 0, 0, 0]]
            for row, seed in enumerate(seeds):
                for name in self.past_names:
                    if ".encoder." in name:
                        np.testing.assert_array_equal(feed[name][row], self.encoder_present[seed][name], name)
                    else:
                        assert feed[name].shape[2] == self.step, name
                        history = np.array(self.fed[seed], np.float32) + self.offset(name)
                        np.testing.assert_array_equal(feed[name][row, 0, :, 0], history, name)
        assert len(set(seeds)) == batch
        np.testing.assert_array_equal(mask.sum(1), [1 + seed % ENCODER_LENGTH for seed in seeds])
        for seed, token in zip(seeds, tokens):
            assert len(self.fed.setdefault(seed, [])) == self.step
            self.fed[seed].append(int(token))

        results = {
            "logits": np.stack([self.logits_fn(s, int(t), self.step) for s, t in zip(seeds, tokens)])[:, None]
        }
        for name in self.past_names:
            present = name.replace("past_key_values", "present")
            if ".decoder." in name:
                new = np.broadcast_to(
                    (tokens + self.offset(name))[:, None, None, None], (batch, LAYOUT.heads, 1, 3)
                )
                results[present] = np.concatenate([feed[name], new.astype(np.float32)], axis=2)
            elif self.step == 0:
                results[present] = np.stack([self.encoder_present[seed][name] for seed in seeds])
            else:  # the with-past branch returns empty constants for the encoder outputs
                results[present] = np.zeros((1, LAYOUT.heads, 0, LAYOUT.head_dim), np.float32)
        self.batches.append(batch)
        self.step += 1
        return [results[name] for name in (names or self.output_names)]


def decode(seeds, options, logits_fn, timings=None):
    embed, decoder = FakeEmbed(), FakeDecoder(logits_fn)
    hidden, mask = encoder_inputs(seeds)
    sequences = greedy_decode(embed, decoder, hidden, mask, options, LAYOUT, timings)
    assert embed.batches == decoder.batches
    return sequences, decoder


def active_rows_per_step(sequences):
    """Row r is fed at step t while it has not finished, i.e. for t < len(sequence) - 1."""
    steps = max(len(s) for s in sequences) - 1
    return [sum(len(s) - 1 > t for s in sequences) for t in range(steps)]


def test_rows_stop_at_eos_and_leave_the_batch():
    vocab = 8

    def logits_fn(seed, token, step):  # row `seed` writes EOS at step `seed`
        logits = np.zeros(vocab, np.float32)
        logits[EOS if step == seed else 3 + (seed + step) % (vocab - 3)] = 1.0
        return logits

    seeds = [3, 0, 5, 1]
    sequences, decoder = decode(seeds, GenerationOptions(max_new_tokens=20), logits_fn)
    for seed, sequence in zip(seeds, sequences):
        assert sequence == [START] + [3 + (seed + t) % (vocab - 3) for t in range(seed)] + [EOS]
    assert decoder.batches == [4, 3, 2, 2, 1, 1]


@pytest.mark.parametrize("forced_eos", [EOS, None])
def test_forced_eos_at_max_new_tokens(forced_eos):
    def logits_fn(seed, token, step):
        return toy_logits(seed, token, step, 10, eos_bias=-100.0, ramp=0.0)

    options = GenerationOptions(max_new_tokens=5, forced_eos_token_id=forced_eos)
    sequences, decoder = decode([7, 11, 13], options, logits_fn)
    assert decoder.batches == [3] * 5
    for sequence in sequences:
        assert len(sequence) == 1 + options.max_new_tokens and sequence[0] == START
        assert EOS not in sequence[1:-1]
        assert (sequence[-1] == EOS) == (forced_eos == EOS)


def test_one_new_token_is_the_forced_eos():
    sequences, decoder = decode(
        [4, 9], GenerationOptions(max_new_tokens=1), lambda s, t, k: np.ones(6, np.float32)
    )
    assert sequences == [[START, EOS], [START, EOS]] and decoder.batches == [2]


def test_timings_are_recorded():
    timings: dict = {}
    options = GenerationOptions(max_new_tokens=4, forced_eos_token_id=None)
    decode([1], options, lambda s, t, k: toy_logits(s, t, k, 9, -100.0, 0.0), timings)
    assert timings["steps"] == 4 and 0 <= timings["first_step"] <= timings["decode"]


@st.composite
def decode_cases(draw):
    vocab = draw(st.integers(5, 16))
    seeds = draw(st.lists(st.integers(0, 200), min_size=1, max_size=4, unique=True))
    token = st.integers(0, vocab - 1)
    min_new_tokens = draw(st.integers(0, 4))
    options = GenerationOptions(
        max_new_tokens=draw(st.integers(1, 10)),
        min_length=draw(min_lengths(min_new_tokens, 6)),
        min_new_tokens=min_new_tokens,
        no_repeat_ngram_size=draw(st.integers(0, 3)),
        forced_bos_token_id=draw(st.none() | token),
        forced_eos_token_id=draw(st.none() | st.just(EOS) | token),
    )
    eos_bias = draw(st.floats(-3, 1))
    ramp = draw(st.floats(0, 1))
    return seeds, options, lambda seed, last, step: toy_logits(seed, last, step, vocab, eos_bias, ramp)


def reference_decode(seed: int, options: GenerationOptions, logits_fn) -> list[int]:
    """One row, no cache, transformers' processors: what generate(num_beams=1) does."""
    processors = hf_processors(hf_config(options))
    sequence = [options.decoder_start_token_id]
    for step in range(options.max_new_tokens):
        scores = hf_process(logits_fn(seed, sequence[-1], step)[None], [sequence], processors)
        sequence.append(int(_torch().from_numpy(scores).argmax(-1)))
        if sequence[-1] == options.eos_token_id:
            break
    return sequence


@DECODE
@given(decode_cases())
def test_greedy_decode_matches_reference_and_single_rows(case):
    seeds, options, logits_fn = case
    sequences, decoder = decode(seeds, options, logits_fn)
    assert sequences == [reference_decode(seed, options, logits_fn) for seed in seeds]
    assert decoder.batches == active_rows_per_step(sequences)
    for seed, sequence in zip(seeds, sequences):
        assert sequence[0] == START and 2 <= len(sequence) <= 1 + options.max_new_tokens
        assert EOS not in sequence[1:-1]
        assert sequence[-1] == EOS or len(sequence) == 1 + options.max_new_tokens
        if options.forced_eos_token_id == EOS:
            assert sequence[-1] == EOS
        alone, _ = decode([seed], options, logits_fn)
        assert alone == [sequence]
