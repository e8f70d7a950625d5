"""Beam search, sampling and box scores against `transformers` generate on the tiny model; the beam
cache protocol on a fake merged decoder; sampling statistics; option checks.

The reference for tokens is `generate(...)` on the same weights. The reference for box scores is
the original Microsoft processor (processing_florence2.py of the Florence-2 checkpoints), called
as the model card shows: `post_process_generation(sequence=..., transition_beam_score=...)` with
`compute_transition_scores(sequences, scores, beam_indices)`. transformers 5's native processor
dropped scores, so `original_box_scores` below ports that code, on transformers' tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tasks import TASKS

from flonnx.runtime import cli
from flonnx.runtime.beam import beam_search, top_k
from flonnx.runtime.decoding import CacheLayout, GenerationOptions, greedy_search
from flonnx.runtime.errors import InputError
from flonnx.runtime.model import Florence2, Request
from flonnx.runtime.sampling import sample, warp
from flonnx.runtime.scores import box_scores

MAX_NEW_TOKENS = 16
EOS = 2
# A repetition penalty below 1 rewards tokens already seen, the decoder start token (= EOS) among
# them: the random tiny model then finishes hypotheses before max_new_tokens, which is what
# length_penalty and early_stopping act on (on this image, <OD> and <OCR> do).
EARLY_EOS = {"repetition_penalty": 0.3}
SETTINGS = {
    "beams2": {"num_beams": 2},
    "beams4": {"num_beams": 4},
    "no_ngram_block": {"no_repeat_ngram_size": 0},
    "length_penalty_0.5": {"length_penalty": 0.5, **EARLY_EOS},
    "length_penalty_2": {"length_penalty": 2.0, **EARLY_EOS},
    "length_penalty_-1": {"length_penalty": -1.0, **EARLY_EOS},
    "early_stopping_true": {"early_stopping": True, **EARLY_EOS},
    "early_stopping_false": {"early_stopping": False, **EARLY_EOS},
    "early_stopping_never": {"early_stopping": "never", **EARLY_EOS},
    "never_length_penalty_2": {"early_stopping": "never", "length_penalty": 2.0, **EARLY_EOS},
    "return_3_of_4": {"num_beams": 4, "num_return_sequences": 3, **EARLY_EOS},
    "min_new_tokens": {"min_new_tokens": 8, "early_stopping": False, **EARLY_EOS},
}
# Representative tasks per setting: for the settings that act on finished hypotheses, two that
# finish early; for the others, boxes with labels and grounding (with its banned phrases).
FINISHING_TASKS = [("<OD>", None), ("<OCR>", None)]
OTHER_TASKS = [("<OD>", None), ("<CAPTION_TO_PHRASE_GROUNDING>", "a dog")]
SETTING_CASES = [
    (name, task, text)
    for name, generation in SETTINGS.items()
    for task, text in (FINISHING_TASKS if "repetition_penalty" in generation else OTHER_TASKS)
]
# Box-producing post-processing types and how the original scorer is applied to each.
SCORED = {
    "description_with_bboxes": {},
    "bboxes": {"allow_empty_phrase": True},
    "phrase_grounding": {"banned": True},
    "description_with_bboxes_or_polygons": {},
}


def _image(seed: int, size=(400, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGE = _image(0)


def _until_eos(tokens: list[int]) -> list[int]:
    """generate pads shorter rows after their EOS; the runtime returns tokens up to EOS."""
    return tokens[: tokens.index(EOS, 1) + 1] if EOS in tokens[1:] else tokens


# -- the reference -------------------------------------------------------------------------------


def original_box_scores(tokenizer, sequence, transition_scores, allow_empty_phrase=False, banned=()):
    """Microsoft's processor: `decode_with_spans`, then the scores of
    `parse_description_with_bboxes_from_text_and_spans(score_mode="avg_loc_scores")`, verbatim
    but for names (the blacklist check is the one of its phrase-grounding parser)."""
    sequence = list(sequence)[1:]
    specials = set(tokenizer.all_special_tokens)
    text, spans = "", []
    for token in tokenizer.convert_ids_to_tokens(sequence, skip_special_tokens=False):
        sub_text = token if token in specials else tokenizer.convert_tokens_to_string([token])
        spans.append((len(text), len(text) + len(sub_text)))
        text += sub_text
    scores = list(transition_scores)
    assert len(scores) == len(sequence)

    cur_span = 3 if text.startswith("<s>") else 0
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    pattern = r"(?:(?:<loc_\d+>){4,})" if allow_empty_phrase else r"([^<]+(?:<loc_\d+>){4,})"
    phrases = re.findall(pattern, text)
    text_pattern = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"
    box_pattern = r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
    result = []
    for phrase_text in phrases:
        phrase_text_strip = phrase_text.replace("<ground>", "", 1)
        phrase_text_strip = phrase_text.replace("<obj>", "", 1)
        if phrase_text_strip == "" and not allow_empty_phrase:
            cur_span += len(phrase_text)
            continue
        phrase = re.search(text_pattern, phrase_text_strip)
        if phrase is None:
            cur_span += len(phrase_text)
            continue
        boxes = list(re.finditer(box_pattern, phrase_text))
        if not boxes or phrase.group().strip() in banned:
            cur_span += len(phrase_text)
            continue
        for box in boxes:
            start, end = box.span(0)
            inds = [
                i for i, s in enumerate(spans) if not (s[1] <= start + cur_span or s[0] >= end + cur_span)
            ]
            loc_scores = [scores[i] for i in inds]
            result.append(math.exp(sum(loc_scores) / len(loc_scores)))
        cur_span += len(phrase_text)
    return result


@pytest.fixture(scope="module")
def generate_reference(tiny_loc_model_dir):
    """`generate` + `post_process_generation` + the original box scores; image features and encoder
    outputs are computed once per image and prompt, so every setting costs only its decoding."""
    torch = pytest.importorskip("torch")
    from transformers import AutoProcessor, Florence2ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_loc_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_loc_model_dir)
    banned = processor.post_processor.banned_grounding_tokens
    image_features: dict[int, tuple] = {}
    encoded: dict[tuple, tuple] = {}

    @torch.no_grad()
    def encode(image, prompt):
        key = (id(image), prompt)
        if key not in encoded:
            inputs = processor(text=prompt, images=image, return_tensors="pt")
            if id(image) not in image_features:  # the image is kept so its id is not reused
                features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
                image_features[id(image)] = (image, features)
            features = image_features[id(image)][1]
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            placeholders = model.model.get_placeholder_mask(
                inputs["input_ids"], inputs_embeds=embeds, image_features=features
            )
            embeds = embeds.masked_scatter(placeholders, features)
            mask = inputs["attention_mask"]
            hidden = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            encoded[key] = (hidden, mask)
        return encoded[key]

    @torch.no_grad()
    def run(image, task, text=None, **generation) -> list[dict]:
        """One entry per returned sequence: tokens, answer, answer scores, token scores."""
        hidden, mask = encode(image, task + (text or ""))
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            max_new_tokens=generation.pop("max_new_tokens", MAX_NEW_TOKENS),
            return_dict_in_generate=True,
            output_scores=True,
            **generation,
        )
        beam_indices = getattr(out, "beam_indices", None)
        if beam_indices is not None:
            transition = model.compute_transition_scores(out.sequences, out.scores, beam_indices)
        else:
            transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        kind = processor.tasks_answer_post_processing_type.get(task, "pure_text")
        found = []
        for sequence, scores in zip(out.sequences.tolist(), transition.tolist()):
            tokens = _until_eos(sequence)
            generated = processor.batch_decode([tokens], skip_special_tokens=False)[0]  # no padding
            answer = processor.post_process_generation(generated, task=task, image_size=image.size)[task]
            box = None
            if kind in SCORED and not (kind.endswith("polygons") and "<poly>" in generated):
                how = SCORED[kind]
                box = original_box_scores(
                    processor.tokenizer,
                    tokens,
                    scores[: len(tokens) - 1],
                    allow_empty_phrase=how.get("allow_empty_phrase", False),
                    banned=banned if how.get("banned") else (),
                )
            found.append({"tokens": tokens, "answer": answer, "box_scores": box, "token_scores": scores})
        return found

    run.processor = processor
    run.model = model
    return run


@pytest.fixture(scope="module")
def model(tiny_export_dir) -> Florence2:
    return Florence2.load(tiny_export_dir, threads=2)


@pytest.fixture(scope="module")
def features(model):
    return model.encode_image(IMAGE)


def assert_matches(result, expected: list[dict]):
    """A runtime Result (with its alternatives) equals the reference's sequences, answers and scores."""
    found = [result, *result.alternatives]
    assert [r.tokens for r in found] == [e["tokens"] for e in expected]
    for ours, theirs in zip(found, expected):
        answer = dict(ours.answer) if isinstance(ours.answer, dict) else ours.answer
        scores = answer.pop("scores", None) if isinstance(answer, dict) else None
        assert answer == theirs["answer"]
        if theirs["box_scores"] is None:
            assert scores is None
        else:
            np.testing.assert_allclose(scores, theirs["box_scores"], rtol=0, atol=1e-5)
        generated = len(ours.tokens) - 1
        np.testing.assert_allclose(ours.token_scores, theirs["token_scores"][:generated], rtol=0, atol=1e-4)


# -- parity with transformers generate -------------------------------------------------------------


@pytest.mark.parametrize(("task", "text"), TASKS, ids=[t for t, _ in TASKS])
def test_every_task_matches_transformers_under_the_checkpoint_settings(
    model, features, generate_reference, task, text
):
    """generation_config.json asks for num_beams=3, no_repeat_ngram_size=3, early_stopping=True."""
    assert model.generation_config["num_beams"] == 3
    (result,) = model.run_batch([Request(features, task, text)], max_new_tokens=MAX_NEW_TOKENS, scores=True)
    assert_matches(result, generate_reference(IMAGE, task, text))


@pytest.mark.parametrize(
    ("name", "task", "text"), SETTING_CASES, ids=[f"{n}-{t}" for n, t, _ in SETTING_CASES]
)
def test_settings_match_transformers(model, features, generate_reference, name, task, text):
    generation = SETTINGS[name]
    (result,) = model.run_batch(
        [Request(features, task, text)], max_new_tokens=MAX_NEW_TOKENS, scores=True, **generation
    )
    assert_matches(result, generate_reference(IMAGE, task, text, **generation))


def test_the_settings_are_exercised(model, features):
    """Guard for the test above: hypotheses finish early, and the settings change the answer."""
    best, finished_early = set(), False
    for name, generation in SETTINGS.items():
        if name.startswith(("early", "length", "return")):
            (result,) = model.run_batch(
                [Request(features, "<OD>")], max_new_tokens=MAX_NEW_TOKENS, **generation
            )
            best.add(tuple(result.tokens))
            finished_early |= any(len(r.tokens) <= MAX_NEW_TOKENS for r in [result, *result.alternatives])
    assert finished_early and len(best) > 1


def test_greedy_scores_match_transformers(model, features, generate_reference):
    for task, text in [("<OD>", None), ("<CAPTION_TO_PHRASE_GROUNDING>", "a dog")]:
        (result,) = model.run_batch(
            [Request(features, task, text)], max_new_tokens=MAX_NEW_TOKENS, scores=True, num_beams=1
        )
        assert_matches(result, generate_reference(IMAGE, task, text, num_beams=1))


def test_batch_of_mixed_prompts_matches_transformers(model, generate_reference):
    images = [_image(1), _image(2, (640, 480)), _image(3, (33, 17))]
    requests = [
        Request(images[0], "<OD>"),
        Request(images[1], "<OCR>"),
        Request(images[2], "<CAPTION_TO_PHRASE_GROUNDING>", "a small dog"),
    ]
    # with EARLY_EOS the requests finish at different steps, so finished ones leave the batch
    batch = model.run_batch(requests, max_new_tokens=MAX_NEW_TOKENS, scores=True, **EARLY_EOS)
    assert len({len(result.tokens) for result in batch}) > 1
    for request, result in zip(requests, batch):
        (alone,) = model.run_batch([request], max_new_tokens=MAX_NEW_TOKENS, scores=True, **EARLY_EOS)
        assert result.tokens == alone.tokens
        # the batch changes the last float bits of the logits, so scores agree to ~1e-7, not exactly
        np.testing.assert_allclose(result.token_scores, alone.token_scores, rtol=0, atol=1e-5)
        assert_matches(result, generate_reference(request.image, request.task, request.text, **EARLY_EOS))


def test_beam_output_differs_from_greedy(model, features):
    """The checkpoint's num_beams=3 is honoured, per call: no more silent greedy decoding."""
    differ = 0
    for task, text in [*FINISHING_TASKS, OTHER_TASKS[1]]:
        request = [Request(features, task, text)]
        beams = model.run_batch(request, max_new_tokens=MAX_NEW_TOKENS)[0]
        greedy = model.run_batch(request, max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0]
        again = model.run_batch(request, max_new_tokens=MAX_NEW_TOKENS)[0]
        assert beams.tokens == again.tokens
        differ += beams.tokens != greedy.tokens
    assert differ


# -- box scores ------------------------------------------------------------------------------------

WORDS = ["Ġcar", "Ġa", "Ġred", "Ġtree", "dog", "Ġthe", "Ġit", "Ġ", "é", "Ã"]


@st.composite
def generated_sequences(draw, tokenizer):
    """Plausible generated sequences: words, runs of location tokens, polygons, stray specials."""
    loc = st.integers(0, 999).map(lambda i: f"<loc_{i}>")
    word = st.sampled_from(WORDS)
    special = st.sampled_from(["</s>", "<pad>", "<s>", "<poly>", "</poly>", "<sep>"])
    pieces = draw(
        st.lists(
            st.one_of(
                st.lists(word, min_size=1, max_size=3),
                st.lists(loc, min_size=3, max_size=9),
                st.lists(special, min_size=1, max_size=1),
            ),
            max_size=6,
        )
    )
    tokens = ["</s>", "<s>"] + [p for piece in pieces for p in piece] + ["</s>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    scores = draw(st.lists(st.floats(-8, 0), min_size=len(ids) - 1, max_size=len(ids) - 1))
    return ids, scores


@pytest.fixture(scope="module")
def hf_tokenizer(generate_reference):
    return generate_reference.processor.tokenizer


def test_box_scores_equal_the_original_processor(model, generate_reference, hf_tokenizer):
    banned = frozenset(generate_reference.processor.post_processor.banned_grounding_tokens)

    @settings(max_examples=150, deadline=None)
    @given(generated_sequences(hf_tokenizer))
    def check(case):
        ids, scores = case
        scores32 = np.array(scores, np.float32).tolist()  # what compute_transition_scores holds
        for kind, how in SCORED.items():
            ours = box_scores(model.tokenizer, ids, scores32, kind, banned)
            text = hf_tokenizer.decode(ids, skip_special_tokens=False)
            if kind.endswith("polygons") and "<poly>" in text:
                assert ours == []
                continue
            expected = original_box_scores(
                hf_tokenizer,
                ids,
                scores32,
                allow_empty_phrase=how.get("allow_empty_phrase", False),
                banned=banned if how.get("banned") else (),
            )
            np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)

    check()


def test_scores_are_off_by_default_and_only_on_box_tasks(model, features):
    plain = model.run_batch([Request(features, "<OD>")], max_new_tokens=12)[0]
    assert "scores" not in plain.answer and plain.token_scores is None
    scored = model.run_batch(
        [Request(features, "<OD>"), Request(features, "<CAPTION>")], max_new_tokens=12, scores=True
    )
    assert len(scored[0].answer["scores"]) == len(scored[0].answer["bboxes"])
    assert all(0 < s <= 1 for s in scored[0].answer["scores"])
    assert isinstance(scored[1].answer, str) and len(scored[1].token_scores) == len(scored[1].tokens) - 1


# -- sampling --------------------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_per_request(model, features):
    requests = [Request(features, "<CAPTION>"), Request(features, "<OD>")]
    kwargs = {"do_sample": True, "num_beams": 1, "max_new_tokens": 15}
    first = model.run_batch(requests, seed=7, **kwargs)
    again = model.run_batch(requests, seed=7, **kwargs)
    alone = model.run_batch(requests[1:], seed=7, **kwargs)
    other = model.run_batch(requests, seed=8, **kwargs)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert first[1].tokens == alone[0].tokens
    assert [r.tokens for r in first] != [r.tokens for r in other]
    several = model.run_batch(requests[:1], seed=7, num_return_sequences=3, **kwargs)[0]
    assert several.tokens == first[0].tokens and len(several.alternatives) == 2
    assert len({str(r.tokens) for r in [several, *several.alternatives]}) > 1


def test_beam_sampling_is_reproducible(model, features):
    kwargs = {"do_sample": True, "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 12}
    first = model.run_batch([Request(features, "<OD>")], seed=3, **kwargs)[0]
    again = model.run_batch([Request(features, "<OD>")], seed=3, **kwargs)[0]
    assert [first.tokens, first.alternatives[0].tokens] == [again.tokens, again.alternatives[0].tokens]
    assert first.tokens[:2] == [2, 0] and len(first.tokens) <= 13


def test_warpers_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    for temperature, top_k_, top_p in [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 50, 0.5), (0.5, 0, 0.05)]:
        for keep in (1, 2):
            options = GenerationOptions(do_sample=True, temperature=temperature, top_k=top_k_, top_p=top_p)
            expected = torch.from_numpy(logits.copy())
            if temperature != 1.0:
                expected = TemperatureLogitsWarper(temperature)(None, expected)
            if top_k_:
                expected = TopKLogitsWarper(top_k_, min_tokens_to_keep=keep)(None, expected)
            if top_p < 1.0:
                expected = TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, expected)
            np.testing.assert_array_equal(warp(logits.copy(), options, keep), expected.numpy())


# -- fake merged decoder: cache protocol and statistics -------------------------------------------

LAYOUT = CacheLayout(layers=2, heads=2, head_dim=3)
DIM = 4
ENCODER_LENGTH = 5


class FakeEmbed:
    def run(self, names, feed):
        ids = feed["input_ids"]
        return [np.repeat(ids[..., None].astype(np.float32), DIM, axis=-1)]


class HistoryDecoder:
    """The merged decoder's protocol in numpy. Logits depend on the request (carried by the hidden
    states, then by the cross-attention K/V) and on the whole history (carried by the
    self-attention K/V), so a cache that follows the wrong beam changes what is decoded."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.names = LAYOUT.past_names()
        self.batches: list[int] = []
        self.seen: set[tuple] = set()
        self.cross: dict[int, np.ndarray] = {}

    def get_outputs(self):
        return [
            SimpleNamespace(name=n)
            for n in ["logits", *(n.replace("past_key_values", "present") for n in self.names)]
        ]

    def run(self, names, feed):
        tokens = feed["inputs_embeds"][:, 0, 0].astype(np.int64)
        batch = len(tokens)
        first = not feed["use_cache_branch"][0]
        assert feed["encoder_attention_mask"].shape == (batch, ENCODER_LENGTH)
        if first:
            hidden = feed["encoder_hidden_states"]
            assert hidden.shape == (batch, ENCODER_LENGTH, DIM)
            requests = hidden[:, 0, 0].astype(np.int64)
            cross = np.broadcast_to(requests[:, None, None, None], (batch, LAYOUT.heads, ENCODER_LENGTH, 3))
            cross = cross.astype(np.float32) + np.arange(ENCODER_LENGTH, dtype=np.float32)[:, None]
            for row, request in enumerate(requests):
                self.cross[int(request)] = cross[row]
        else:
            assert feed["encoder_hidden_states"].shape[:2] == (batch, 0)
            cross = feed["past_key_values.0.encoder.key"]
            requests = cross[:, 0, 0, 0].astype(np.int64)
            for name in self.names:
                if ".encoder." in name:  # never recomputed, only carried along
                    for row, request in enumerate(requests):
                        np.testing.assert_array_equal(feed[name][row], self.cross[int(request)])
        past = feed["past_key_values.0.decoder.key"][:, 0, :, 0].astype(np.int64)
        logits = []
        for request, history, token in zip(requests, past, tokens):
            sequence = (*history.tolist(), int(token))
            self.seen.add((int(request), sequence))
            logits.append(self.logits_fn(int(request), sequence))
        self.batches.append(batch)
        out = {"logits": np.stack(logits)[:, None].astype(np.float32)}
        for name in self.names:
            present = name.replace("past_key_values", "present")
            if ".decoder." in name:
                new = np.broadcast_to(tokens[:, None, None, None], (batch, LAYOUT.heads, 1, 3)).astype(
                    np.float32
                )
                out[present] = np.concatenate([feed[name], new], axis=2)
            elif first:
                out[present] = np.ascontiguousarray(cross)
            else:
                out[present] = np.zeros((1, LAYOUT.heads, 0, 3), np.float32)
        return [out[n] for n in names]


def _encoder(requests: list[int]):
    hidden = np.zeros((len(requests), ENCODER_LENGTH, DIM), np.float32)
    hidden[:, 0, 0] = requests
    return hidden, np.ones((len(requests), ENCODER_LENGTH), np.int64)


def _history_logits(vocab: int):
    def logits_fn(request: int, sequence: tuple) -> np.ndarray:
        rng = np.random.default_rng([request, *sequence])
        logits = rng.standard_normal(vocab) * 2
        logits[EOS] += 0.5 * len(sequence) - 3 + request % 3  # requests finish at different steps
        return logits

    return logits_fn


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_cache_follows_the_beams_and_keeps_cross_attention(early_stopping):
    requests = [11, 12, 13]
    decoder = HistoryDecoder(_history_logits(12))
    options = GenerationOptions(
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=10,
        forced_eos_token_id=None,
        early_stopping=early_stopping,
        no_repeat_ngram_size=2,
    )
    results = beam_search(FakeEmbed(), decoder, *_encoder(requests), options, LAYOUT)
    assert decoder.batches[0] == len(requests)  # step 0: one row per request, not per beam
    later = decoder.batches[1:]
    assert all(batch % 3 == 0 for batch in later) and later == sorted(later, reverse=True)
    for request, hypotheses in zip(requests, results):
        assert len(hypotheses) == 3
        for hypothesis in hypotheses:
            tokens = hypothesis.tokens
            assert tokens[0] == 2 and len(hypothesis.token_scores) == len(tokens) - 1
            # every prefix was extended with logits computed from that very prefix's cache
            for end in range(1, len(tokens)):
                assert (request, tuple(tokens[:end])) in decoder.seen


def test_beam_search_on_a_request_alone_equals_in_a_batch():
    options = GenerationOptions(
        num_beams=4, num_return_sequences=2, max_new_tokens=8, forced_eos_token_id=None
    )
    together = beam_search(
        FakeEmbed(), HistoryDecoder(_history_logits(9)), *_encoder([5, 6, 7]), options, LAYOUT
    )
    for request, found in zip([5, 6, 7], together):
        (alone,) = beam_search(
            FakeEmbed(), HistoryDecoder(_history_logits(9)), *_encoder([request]), options, LAYOUT
        )
        assert [h.tokens for h in found] == [h.tokens for h in alone]


def test_first_sampled_tokens_follow_the_distribution():
    """4000 samples of one step against softmax(logits / T) restricted by top-k and top-p."""
    vocab = 8
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)

    def probabilities(options):
        warped = warp(logits[None].copy(), options)[0].astype(np.float64)
        p = np.exp(warped - warped.max())
        return p / p.sum()

    for temperature, top_k_, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.5, 0, 0.8)]:
        options = GenerationOptions(
            do_sample=True,
            max_new_tokens=1,
            forced_eos_token_id=None,
            num_return_sequences=4000,
            temperature=temperature,
            top_k=top_k_,
            top_p=top_p,
        )
        decoder = HistoryDecoder(lambda request, sequence: logits)
        (found,) = sample(FakeEmbed(), decoder, *_encoder([1]), options, LAYOUT, seed=123)
        counts = np.bincount([h.tokens[1] for h in found], minlength=vocab)
        expected = probabilities(options) * len(found)
        assert (counts[expected == 0] == 0).all()  # filtered tokens are never drawn
        kept = expected > 0
        chi2 = (((counts - expected) ** 2)[kept] / expected[kept]).sum()
        assert chi2 < 30, (temperature, top_k_, top_p, counts, expected.round())  # p < 1e-4 for <= 7 dof
    assert (probabilities(GenerationOptions(top_k=3)) > 0).sum() == 3


def test_greedy_search_scores_are_log_probabilities():
    logits = np.log(np.array([0.1, 0.2, 0.6, 0.1], np.float32))
    decoder = HistoryDecoder(lambda request, sequence: logits + 5.0)
    options = GenerationOptions(max_new_tokens=3, forced_eos_token_id=None, eos_token_id=3)
    (found,) = greedy_search(FakeEmbed(), decoder, *_encoder([1]), options, LAYOUT, scores=True)
    assert found.tokens == [2, 2, 2, 2]
    np.testing.assert_allclose(found.token_scores, np.log(0.6), atol=1e-6)


def test_top_k_orders_ties_by_index():
    rng = np.random.default_rng(1)
    for width in (7, 5000, 154000):
        values = rng.integers(-3, 3, (2, width)).astype(np.float32)
        values[:, rng.integers(0, width, width // 2)] = -np.inf
        for k in (1, 6, 16):
            np.testing.assert_array_equal(top_k(values, k), np.argsort(-values, axis=1, kind="stable")[:, :k])


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "fragment"),
    [
        ({"num_beams": 0}, "num_beams must be at least 1, got 0"),
        ({"num_beams": -2}, "num_beams"),
        (
            {"num_beams": 3, "num_return_sequences": 4},
            "num_return_sequences (4) must be at most num_beams (3)",
        ),
        ({"num_beams": 1, "num_return_sequences": 2}, "num_return_sequences=2"),
        ({"num_return_sequences": 0}, "num_return_sequences must be a positive integer, got 0"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_length": -3}, "min_length must be a non-negative integer, got -3"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": 0.0}, "temperature must be a positive number, got 0.0"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"length_penalty": "long"}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping must be true, false or \"never\", got 'sometimes'"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a positive number, got 0"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"seed": "7"}, "seed"),
        ({"scores": "yes"}, "scores must be true or false"),
    ],
)
def test_bad_generation_options_name_the_value(model, generation, fragment):
    with pytest.raises(InputError) as raised:
        model.run(IMAGE, "<OD>", **{"max_new_tokens": 5, **generation})
    assert fragment in str(raised.value)


def test_from_config_reads_the_beam_settings():
    config = {"num_beams": 3, "early_stopping": "never", "length_penalty": 2, "num_return_sequences": 2}
    options = GenerationOptions.from_config(config, 1024)
    assert (options.num_beams, options.early_stopping, options.length_penalty) == (3, "never", 2)
    assert (
        GenerationOptions.from_config(config, 1024, num_beams=4, early_stopping=False).early_stopping is False
    )
    assert GenerationOptions.from_config({}, 4096) == GenerationOptions()
    assert GenerationOptions().top_k == 50  # transformers' default when sampling


def test_cli_takes_the_decoding_flags(tiny_export_dir, model, tmp_path, capsys):
    path = tmp_path / "image.png"
    IMAGE.save(path)
    argv = ["run", str(tiny_export_dir), str(path), "--task", "<OD>", "--max-new-tokens", "12", "--scores"]
    assert cli.main([*argv, "--num-beams", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = model.run_batch([Request(IMAGE, "<OD>")], max_new_tokens=12, num_beams=2, scores=True)[0]
    assert printed["<OD>"] == expected.answer and "scores" in printed["<OD>"]
    assert cli.main([*argv, "--do-sample", "--seed", "5", "--num-beams", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    sampled = model.run(IMAGE, "<OD>", max_new_tokens=12, num_beams=1, do_sample=True, seed=5, scores=True)
    assert printed["<OD>"] == sampled["<OD>"]
    assert cli.main([*argv, "--num-beams", "0"]) == 2
    assert "num_beams" in capsys.readouterr().err
