"""`Florence2`: an export folder loaded into onnxruntime sessions, and the request pipeline.

image -> preprocess -> vision_encoder -> [image features | prompt embeddings] -> encoder_model
-> greedy search, beam search or sampling on decoder_model_merged -> text -> the dict
`post_process_generation` returns.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .beam import beam_search
from .decoding import CacheLayout, GenerationOptions, Hypothesis, greedy_search
from .errors import InputError, ModelFolderError
from .folder import (
    REQUIRED_FILES,
    ModelShape,
    Selection,
    check_decoder,
    check_links,
    default_variant,
    generation_settings,
    inside,
    model_shape,
    read_json,
    require_graphs,
    select,
)
from .manifest import CONFIG_FILES, MANIFEST, VERIFY_MODES, read_manifest, verify_files
from .postprocess import DEFAULT_POST_PROCESSOR_CONFIG, decode_generated, post_process
from .preprocess import ImageInput, ImagePreprocessor, load_image
from .prompts import TaskTable, build_prompt, check_length, prompt_ids
from .sampling import resolve_seed, sample
from .scores import box_scores
from .sessions import check_providers, open_session, physical_cores, warn_fallen
from .vocabulary import load_tokenizer


@dataclass(frozen=True)
class ImageFeatures:
    """The vision encoder's output for one image, reusable across tasks on that image."""

    features: np.ndarray  # float32 [N, D]
    image_size: tuple[int, int]  # (width, height) of the original image


@dataclass(frozen=True)
class Request:
    """One task on one image. `image` may be features from `Florence2.encode_image`."""

    image: ImageInput | ImageFeatures
    task: str
    text: str | None = None
    region: str | Sequence[float] | None = None


@dataclass(frozen=True)
class Result:
    task: str
    answer: Any  # what post_process_generation returns under the task key
    text: str  # the generated text, special tokens kept
    tokens: list[int] = field(repr=False)  # generated ids, from the decoder start token to EOS
    # with scores=True: the log-probability of each generated token (tokens[1:])
    token_scores: list[float] | None = field(default=None, repr=False)
    # with num_return_sequences > 1: the other sequences, best first
    alternatives: tuple[Result, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict:
        return {self.task: self.answer}


def open_sessions(folder: Path, files: Mapping[str, str], threads: int, providers: list[str]) -> dict:
    """One session per component, opened concurrently: onnxruntime releases the GIL while it reads
    and optimizes a graph, so the four loads overlap (base int8 cold start, import included, median
    0.81 s -> 0.68 s over five alternating pairs on 2 cores). The first failing component's error
    is raised, as a serial load would raise it."""
    names = sorted(files, key=lambda name: name != "decoder_model_merged")  # the largest first
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="flonnx-load") as pool:
        futures = {
            name: pool.submit(
                open_session, folder / files[name], threads, providers, name == "decoder_model_merged"
            )
            for name in names
        }
    sessions = {}
    for name in names:
        session, fallen = futures[name].result()
        warn_fallen(folder / files[name], fallen, session.get_providers(), stacklevel=4)
        sessions[name] = session
    return sessions


class Florence2:
    """A loaded model folder. Immutable: every per-call option is an argument."""

    def __init__(
        self,
        folder: Path,
        manifest: dict | None,
        selection: Selection,
        sessions: dict,
        threads: int,
        shape: ModelShape,
        generation_config: dict,
        preprocessor: dict,
    ):
        self.folder = folder
        self.manifest = manifest  # None for a folder without flonnx.json (e.g. onnx-community's)
        self.variant = selection.label
        self.dtypes = selection.dtypes
        self.threads = threads
        self.shape = shape
        self._sessions = sessions
        # A vision encoder with a fixed batch (flonnx pack --static) takes that many images per run.
        batch = sessions["vision_encoder"].get_inputs()[0].shape[0]
        self._vision_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.num_image_tokens = shape.num_image_tokens
        self.max_positions = shape.max_positions
        self.layout = CacheLayout(shape.layers, shape.heads, shape.head_dim)
        self.preprocessor = ImagePreprocessor.from_config(preprocessor)
        self.tasks = TaskTable.from_config(preprocessor)
        # onnx-community folders carry no parsing rules: the original processor's built-in ones apply.
        rules = preprocessor.get("post_processor_config")
        self.post_processor_config = rules or DEFAULT_POST_PROCESSOR_CONFIG
        grounding = self.post_processor_config.get("phrase_grounding") or {}
        self._banned_phrases = frozenset(grounding.get("banned_grounding_tokens", []))
        self.generation_config = generation_config
        self.tokenizer = load_tokenizer(inside(folder, "tokenizer.json"))
        self.pad_token_id = int(self.generation_config.get("pad_token_id", 1))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        variant: str | Mapping[str, str] | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        verify: str = "cached",
    ) -> Florence2:
        """Open a model folder: a flonnx export, or a folder of ONNX graphs in the onnx-community
        layout without flonnx.json. `variant` (default: fp32, or the only variant the manifest lists,
        as in a pack): a variant the manifest lists, a transformers.js dtype
        ("q4", "fp16", ...), or a dtype per component ({"decoder_model_merged": "q4"}). With a
        manifest, every file it records is checked against its sha256 once per file identity
        (`verify="cached"`, remembered across processes); `verify="sha256"` hashes every file on
        every load, `verify="size"` only compares sizes."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"model folder not found: {folder}")
        if verify not in VERIFY_MODES:
            raise InputError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        manifest = read_manifest(folder) if (folder / MANIFEST).exists() else None
        if manifest is None:
            require_graphs(folder)
        selection = select(folder, manifest, default_variant(manifest) if variant is None else variant)
        check_links(folder)
        for name in REQUIRED_FILES:
            if not inside(folder, name).is_file():
                raise ModelFolderError(f"{folder / name} is missing")
        if manifest is not None:
            configs = [name for name in CONFIG_FILES if name in manifest.get("files", {})]
            verify_files(folder, manifest, [*selection.listed, *configs], mode=verify)
            unlisted = [f for f in selection.files.values() if f not in selection.listed]
            if unlisted:
                warnings.warn(f"{', '.join(unlisted)} not recorded in {MANIFEST}: unverified", stacklevel=2)
        elif verify == "sha256":
            raise InputError(f"{folder} has no {MANIFEST}, so there are no hashes to verify against")
        else:
            warnings.warn(
                f"{folder} has no {MANIFEST}: its files are unverified (loaded as an onnx-community folder)",
                stacklevel=2,
            )
        config = read_json(folder, "config.json")
        preprocessor = read_json(folder, "preprocessor_config.json")
        shape = model_shape(manifest, config, preprocessor)
        generation, corrected = generation_settings(folder, manifest, config)
        if corrected:
            warnings.warn(
                f"generation_config.json disagrees with config.json's text_config; using text_config's "
                f"{', '.join(corrected)}",
                stacklevel=2,
            )
        threads = threads or physical_cores()
        chosen = check_providers(providers)
        # Only the decoder's threads spin between runs: it runs many short steps, where waking
        # sleeping threads would cost. Spinning threads of the other sessions only steal a core from
        # the session that runs next (base int8 <OD>: first decoder step 38 ms instead of 57, 64
        # steps 0.37-0.40 s instead of 0.39-0.43).
        sessions = open_sessions(folder, selection.files, threads, chosen)
        check_decoder(sessions["decoder_model_merged"], shape, selection.files["decoder_model_merged"])
        return cls(folder, manifest, selection, sessions, threads, shape, generation, preprocessor)

    # -- stages -------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[ImageInput], timings: dict | None = None) -> list[ImageFeatures]:
        started = time.perf_counter()
        loaded = [load_image(image) for image in images]
        batch = self.preprocessor(loaded)
        preprocessed = time.perf_counter()
        pixels = batch.pixel_values
        step = self._vision_batch or len(pixels)
        vision = self._sessions["vision_encoder"]
        features = np.concatenate(
            [vision.run(None, {"pixel_values": pixels[i : i + step]})[0] for i in range(0, len(pixels), step)]
        )
        if timings is not None:
            timings["preprocess"] = timings.get("preprocess", 0.0) + preprocessed - started
            timings["vision"] = timings.get("vision", 0.0) + time.perf_counter() - preprocessed
        return [ImageFeatures(f, size) for f, size in zip(features, batch.image_sizes)]

    def encode_image(self, image: ImageInput) -> ImageFeatures:
        """Run the vision encoder once; pass the result as `image` to run several tasks on it."""
        return self.encode_images([image])[0]

    def _features(self, requests: Sequence[Request], timings: dict | None) -> list[ImageFeatures]:
        """Image features per request; each distinct raw image goes through the vision encoder once."""
        raw: dict[int, ImageInput] = {}
        for request in requests:
            if not isinstance(request.image, ImageFeatures):
                raw.setdefault(id(request.image), request.image)
        encoded = dict(zip(raw, self.encode_images(list(raw.values()), timings))) if raw else {}
        features = []
        for request in requests:
            item = request.image if isinstance(request.image, ImageFeatures) else encoded[id(request.image)]
            if item.features.shape[0] != self.num_image_tokens:
                raise InputError(
                    f"image features have {item.features.shape[0]} tokens; "
                    f"this export expects {self.num_image_tokens}"
                )
            features.append(item)
        return features

    def _encoder_inputs(self, requests, features) -> tuple[np.ndarray, np.ndarray]:
        ids = []
        for request, item in zip(requests, features):
            prompt = build_prompt(request.task, request.text, request.region, item.image_size, self.tasks)
            tokens = prompt_ids(self.tokenizer, prompt)
            check_length(len(tokens), self.num_image_tokens, self.max_positions)
            ids.append(tokens)
        width = max(len(tokens) for tokens in ids)
        padded = np.full((len(ids), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(ids), self.num_image_tokens + width), np.int64)
        mask[:, : self.num_image_tokens] = 1
        for row, tokens in enumerate(ids):
            padded[row, : len(tokens)] = tokens
            mask[row, self.num_image_tokens : self.num_image_tokens + len(tokens)] = 1
        embeds = self._sessions["embed_tokens"].run(None, {"input_ids": padded})[0]
        image = np.stack([item.features for item in features]).astype(embeds.dtype, copy=False)
        return np.concatenate([image, embeds], axis=1), mask

    def generation_options(self, **overrides) -> GenerationOptions:
        """This folder's generation_config.json with per-call overrides (None keeps the default)."""
        return GenerationOptions.from_config(self.generation_config, self.max_positions, **overrides)

    # -- requests -----------------------------------------------------------------------------

    def run_batch(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int | None = None,
        scores: bool = False,
        seed: int | None = None,
        timings: dict | None = None,
        **generation,
    ) -> list[Result]:
        """Run several requests in one batch; each result equals running its request alone with fp32
        graphs (dynamic int8 quantizes activations with one scale per batch, so int8 answers can
        differ slightly between a batch and single requests).

        `generation` overrides generation_config.json (num_beams, do_sample, length_penalty, ... as
        in `transformers` generate). `scores=True` adds a "scores" list, one per box, to answers
        with "bboxes"; `seed` makes sampling reproducible.
        """
        requests = list(requests)
        if not requests:
            raise InputError("no requests to run")
        for request in requests:
            if not isinstance(request, Request):
                raise InputError(f"run_batch takes Request objects, got {type(request).__name__}")
        if not isinstance(scores, bool):
            raise InputError(f"scores must be true or false, got {scores!r}")
        seed = None if seed is None else resolve_seed(seed)
        options = self.generation_options(max_new_tokens=max_new_tokens, **generation)
        features = self._features(requests, timings)
        started = time.perf_counter()
        embeds, mask = self._encoder_inputs(requests, features)
        prompted = time.perf_counter()
        hidden = self._sessions["encoder_model"].run(None, {"inputs_embeds": embeds, "attention_mask": mask})[
            0
        ]
        encoded = time.perf_counter()
        found = self._decode(hidden, mask, options, scores, seed, timings)
        decoded = time.perf_counter()
        results = []
        for request, item, hypotheses in zip(requests, features, found):
            best, *others = (self._result(request, item, h, scores) for h in hypotheses)
            results.append(replace(best, alternatives=tuple(others)) if others else best)
        if timings is not None:
            timings["prompt"] = prompted - started
            timings["encoder"] = encoded - prompted
            timings["encoder_tokens"] = hidden.shape[1]  # what every decoder step cross-attends to
            timings["postprocess"] = time.perf_counter() - decoded
        return results

    def _decode(self, hidden, mask, options: GenerationOptions, scores: bool, seed, timings):
        """Hypotheses per request: greedy (the fast path), beam search or sampling, as generate picks."""
        sessions = (self._sessions["embed_tokens"], self._sessions["decoder_model_merged"])
        if options.num_beams > 1:
            return beam_search(*sessions, hidden, mask, options, self.layout, seed=seed, timings=timings)
        if options.do_sample:
            return sample(*sessions, hidden, mask, options, self.layout, seed, scores, timings)
        return [[h] for h in greedy_search(*sessions, hidden, mask, options, self.layout, scores, timings)]

    def _result(self, request: Request, item: ImageFeatures, hypothesis: Hypothesis, scores: bool) -> Result:
        text = decode_generated(self.tokenizer, hypothesis.tokens)
        answer = post_process(text, request.task, item.image_size, self.post_processor_config, self.tasks)
        answer = answer[request.task]
        if not scores:
            return Result(request.task, answer, text, hypothesis.tokens)
        token_scores = hypothesis.token_scores.tolist()
        kind = self.tasks.post_processing_type(request.task)
        boxes = box_scores(self.tokenizer, hypothesis.tokens, token_scores, kind, self._banned_phrases)
        if boxes is not None and isinstance(answer, dict) and "bboxes" in answer:
            if len(boxes) != len(answer["bboxes"]):
                raise RuntimeError(f"{len(boxes)} scores for {len(answer['bboxes'])} boxes in {text!r}")
            answer = {**answer, "scores": boxes}
        return Result(request.task, answer, text, hypothesis.tokens, token_scores)

    def run(
        self,
        image: ImageInput | ImageFeatures,
        task: str,
        text: str | None = None,
        region: str | Sequence[float] | None = None,
        **options,
    ) -> dict:
        """`{task: answer}` for one image, as `post_process_generation` returns it; `options` as for
        `run_batch` (max_new_tokens, num_beams, scores, seed, ...)."""
        return self.run_batch([Request(image, task, text, region)], **options)[0].as_dict()
