"""What a quantized variant costs and gains against fp32, measured with the runtime.

Per component, each graph of the variant gets exactly the inputs fp32 got, so errors do not pile
up: max and mean abs error and cosine similarity of the outputs. End to end, the variant runs the
whole pipeline by itself: greedy decoding (the runtime's) gives the first position where its tokens
leave fp32's, and teacher forcing along fp32's tokens gives the share of steps at which it picks
fp32's next token (a divergence early on would otherwise hide every later step). Timings compare
the vision encoder, the text encoder and one decode step with fp32 in the same process, on the CPU:
float16 variants (fp16, q4f16) are slower there than fp32, and the report says so.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from flonnx.runtime.decoding import CacheLayout, GenerationOptions, greedy_decode, process_logits
from flonnx.runtime.errors import InputError
from flonnx.runtime.manifest import COMPONENTS, component_data_files, read_manifest, variant_files
from flonnx.runtime.preprocess import ImagePreprocessor, load_preprocessor_config
from flonnx.runtime.prompts import TaskTable, build_prompt, check_length, prompt_ids
from flonnx.runtime.sessions import check_providers, create_session, physical_cores
from flonnx.runtime.vocabulary import load_tokenizer

from .calibration import CALIBRATION_TASKS, CalibrationTask, calibration_images
from .recipes import FLOAT16_DTYPES

TIMED_STAGES = ("vision_encoder", "encoder_model", "decode_step")
# The components each timed stage runs.
STAGE_COMPONENTS = {
    "vision_encoder": ("vision_encoder",),
    "encoder_model": ("encoder_model",),
    "decode_step": ("embed_tokens", "decoder_model_merged"),
}
FLOAT16_ON_CPU = (
    "on x86 CPUs and in WASM most kernels have no float16 form and onnxruntime casts around them: "
    "float16 variants are for GPUs and WebGPU"
)


@dataclass(frozen=True)
class ReportOptions:
    max_new_tokens: int = 32
    min_agreement: float = 0.9  # teacher-forced token agreement below this fails the report
    min_cosine: float = 0.99  # a component whose outputs' cosine similarity is below this fails it
    repeats: int = 3  # timed runs of the vision encoder and the text encoder (median)
    decode_repeats: int = 20  # timed decode steps (median)
    threads: int | None = None  # onnxruntime threads (default: physical cores)
    tasks: tuple[CalibrationTask, ...] = CALIBRATION_TASKS

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 1023:
            raise InputError(f"max_new_tokens must be 1..1023, got {self.max_new_tokens!r}")
        for name in ("min_agreement", "min_cosine"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"{name} must be between 0 and 1, got {value!r}")
        for name in ("repeats", "decode_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"threads must be a positive integer, got {self.threads!r}")
        if not self.tasks:
            raise InputError("the report needs at least one task")


@dataclass(frozen=True)
class ComponentReport:
    component: str
    dtype: str
    file: str
    size: int
    fp32_size: int
    max_abs_error: float
    mean_abs_error: float
    cosine: float


@dataclass(frozen=True)
class TaskReport:
    task: str
    tokens: int  # fp32 tokens compared, over all images
    agreement: float  # teacher-forced: share of steps where the variant picks fp32's next token
    # earliest index where free-running tokens differ (index 0 is the decoder start token, so 1
    # is the first generated token), over all images; None: identical everywhere
    first_divergence: int | None
    identical: int  # images on which the variant's tokens equal fp32's


@dataclass(frozen=True)
class TimingReport:
    stage: str
    fp32_ms: float
    variant_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.variant_ms if self.variant_ms else float("inf")


@dataclass(frozen=True)
class Flag:
    kind: str  # "accuracy" fails the report; "speed" is reported
    message: str


@dataclass(frozen=True)
class Report:
    variant: str
    images: list[str]
    threads: int
    options: dict
    components: list[ComponentReport]
    tasks: list[TaskReport]
    timings: list[TimingReport]
    flags: list[Flag] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(flag.kind == "accuracy" for flag in self.flags)

    @property
    def size(self) -> int:
        return sum(c.size for c in self.components)

    @property
    def fp32_size(self) -> int:
        return sum(c.fp32_size for c in self.components)

    @property
    def float16_components(self) -> list[str]:
        return [c.component for c in self.components if c.dtype in FLOAT16_DTYPES]

    def as_dict(self) -> dict:
        data = asdict(self)
        for timing, record in zip(self.timings, data["timings"]):
            record["speedup"] = round(timing.speedup, 3)
        data.update(size=self.size, fp32_size=self.fp32_size, passed=self.passed)
        return _finite(data)

    def table(self) -> str:
        return format_table(self)


def _finite(value):
    """JSON has no NaN or infinity: a broken variant's errors are stored as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# -- statistics -------------------------------------------------------------------------------


@dataclass
class _Errors:
    """Running max/mean abs error and cosine similarity of a variant's outputs against fp32's."""

    max_abs: float = 0.0
    total_abs: float = 0.0
    count: int = 0
    dot: float = 0.0
    reference_norm: float = 0.0
    variant_norm: float = 0.0

    def add(self, reference: np.ndarray, variant: np.ndarray) -> None:
        if reference.shape != variant.shape:
            raise InputError(f"output shapes differ: fp32 {reference.shape}, variant {variant.shape}")
        a, b = reference.astype(np.float64).ravel(), variant.astype(np.float64).ravel()
        diff = np.abs(a - b)
        if diff.size:
            worst = float(diff.max())  # NaN from a broken graph stays NaN
            self.max_abs = worst if np.isnan(worst) or np.isnan(self.max_abs) else max(self.max_abs, worst)
        self.total_abs += float(diff.sum())
        self.count += diff.size
        self.dot += float(a @ b)
        self.reference_norm += float(a @ a)
        self.variant_norm += float(b @ b)

    @property
    def mean_abs(self) -> float:
        return self.total_abs / self.count if self.count else 0.0

    @property
    def cosine(self) -> float:
        norm = np.sqrt(self.reference_norm * self.variant_norm)
        if norm == 0:
            return 1.0 if self.reference_norm == self.variant_norm else 0.0
        return float(self.dot / norm)


def first_divergence(reference: Sequence[int], variant: Sequence[int]) -> int | None:
    for position, (a, b) in enumerate(zip(reference, variant)):
        if a != b:
            return position
    return None if len(reference) == len(variant) else min(len(reference), len(variant))


# -- one variant's sessions ------------------------------------------------------------------------


class _Graphs:
    """The four sessions of one variant, created the way the runtime creates them."""

    def __init__(self, folder: Path, files: dict[str, str], threads: int, layout: CacheLayout):
        providers = check_providers(None)
        self.sessions = {
            name: create_session(folder / files[name], threads, providers) for name in COMPONENTS
        }
        self.layout = layout
        decoder = self.sessions["decoder_model_merged"]
        self.decoder_outputs = [output.name for output in decoder.get_outputs()]

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["vision_encoder"].run(None, {"pixel_values": pixels})[0]

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return self.sessions["embed_tokens"].run(None, {"input_ids": np.array([ids], np.int64)})[0]

    def encode(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"inputs_embeds": embeds, "attention_mask": mask}
        return self.sessions["encoder_model"].run(None, feed)[0]

    def empty_past(self) -> dict[str, np.ndarray]:
        layout = self.layout
        return {n: np.zeros((1, layout.heads, 0, layout.head_dim), np.float32) for n in layout.past_names()}

    def decode(self, embeds, hidden, mask, past: dict | None = None) -> dict[str, np.ndarray]:
        """One decoder call: no-past (all of `embeds` at once) when `past` is None, else with past."""
        feed = {
            "inputs_embeds": embeds,
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden if past is None else hidden[:, :0],
            "use_cache_branch": np.array([past is not None]),
            **(past if past is not None else self.empty_past()),
        }
        return dict(zip(self.decoder_outputs, self.sessions["decoder_model_merged"].run(None, feed)))

    def generate(self, hidden, mask, options: GenerationOptions) -> list[int]:
        embed, decoder = self.sessions["embed_tokens"], self.sessions["decoder_model_merged"]
        return greedy_decode(embed, decoder, hidden, mask, options, self.layout)[0]


def _past_from(outputs: dict[str, np.ndarray], layout: CacheLayout) -> dict[str, np.ndarray]:
    return {name: outputs[name.replace("past_key_values", "present")] for name in layout.past_names()}


def _teacher_forced_matches(logits: np.ndarray, tokens: list[int], options: GenerationOptions) -> int:
    """Steps at which the processed logits (fed fp32's `tokens`) pick fp32's next token."""
    matches = 0
    for step in range(len(tokens) - 1):
        row = process_logits(logits[step][None].copy(), [tokens[: step + 1]], options)
        matches += int(row[0].argmax()) == tokens[step + 1]
    return matches


def _ms(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1000


def _timed(stage: str, reference: Callable, variant: Callable, repeats: int) -> TimingReport:
    """Median of interleaved runs, so both see the same machine load. Both sessions have already
    run these inputs while being measured: no warm-up is needed."""
    fp32, quantized = [], []
    for _ in range(repeats):
        fp32.append(_ms(reference))
        quantized.append(_ms(variant))
    return TimingReport(stage, round(statistics.median(fp32), 3), round(statistics.median(quantized), 3))


# -- the measurement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Folder:
    """What the measurement reads from the export folder besides the graphs."""

    preprocessor: ImagePreprocessor
    tasks: TaskTable
    tokenizer: Tokenizer
    generation: GenerationOptions
    layout: CacheLayout
    image_tokens: int
    max_positions: int

    @classmethod
    def read(cls, folder: Path, manifest: dict, max_new_tokens: int) -> _Folder:
        model = manifest["model"]
        max_positions = int(model["max_position_embeddings"])
        config = json.loads((folder / "generation_config.json").read_text())
        # Greedy whatever the config asks (often num_beams=3): agreement is measured step by step.
        generation = GenerationOptions.from_config(
            config,
            max_positions,
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
            num_return_sequences=1,
        )
        return cls(
            preprocessor=ImagePreprocessor.from_folder(folder),
            tasks=TaskTable.from_config(load_preprocessor_config(folder)),
            tokenizer=load_tokenizer(folder / "tokenizer.json"),
            generation=generation,
            layout=CacheLayout(
                int(model["decoder_layers"]), int(model["decoder_heads"]), int(model["head_dim"])
            ),
            image_tokens=int(model["num_image_tokens"]),
            max_positions=max_positions,
        )

    def prompt(self, task: CalibrationTask, image_size) -> list[int]:
        ids = prompt_ids(self.tokenizer, build_prompt(task.task, task.text, None, image_size, self.tasks))
        check_length(len(ids), self.image_tokens, self.max_positions)
        return ids


@dataclass
class _TaskTally:
    tokens: int = 0
    matches: int = 0
    first: int | None = None
    identical: int = 0

    def add(self, reference: list[int], variant: list[int], matches: int) -> None:
        self.tokens += len(reference) - 1
        self.matches += matches
        divergence = first_divergence(reference, variant)
        self.identical += divergence is None
        if divergence is not None and (self.first is None or divergence < self.first):
            self.first = divergence


def _compare_task(reference: _Graphs, quantized: _Graphs, context: _Folder, features, ids, errors, tally):
    """One prompt on one image: per-component errors on fp32's inputs, then the variant end to end.
    Returns the inputs the timings reuse."""
    features_ref, features_var = features
    mask = np.ones((1, context.image_tokens + len(ids)), np.int64)
    embeds_ref, embeds_var = reference.embed(ids), quantized.embed(ids)
    errors["embed_tokens"].add(embeds_ref, embeds_var)
    inputs_ref = np.concatenate([features_ref, embeds_ref], axis=1)
    hidden_ref = reference.encode(inputs_ref, mask)
    errors["encoder_model"].add(hidden_ref, quantized.encode(inputs_ref, mask))
    tokens_ref = reference.generate(hidden_ref, mask, context.generation)

    # The decoder alone, on fp32's inputs: every position at once (no-past branch), then one
    # step with fp32's cache (with-past branch).
    prefix = reference.embed(tokens_ref[:-1])
    out_ref = reference.decode(prefix, hidden_ref, mask)
    errors["decoder_model_merged"].add(
        out_ref["logits"], quantized.decode(prefix, hidden_ref, mask)["logits"]
    )
    past = _past_from(out_ref, context.layout)
    last = reference.embed(tokens_ref[-1:])
    step_ref = reference.decode(last, hidden_ref, mask, past)
    errors["decoder_model_merged"].add(
        step_ref["logits"], quantized.decode(last, hidden_ref, mask, past)["logits"]
    )

    # The variant end to end, on its own features, embeddings and encoder states.
    hidden_var = quantized.encode(np.concatenate([features_var, embeds_var], axis=1), mask)
    tokens_var = quantized.generate(hidden_var, mask, context.generation)
    forced = quantized.decode(quantized.embed(tokens_ref[:-1]), hidden_var, mask)["logits"][0]
    tally.add(tokens_ref, tokens_var, _teacher_forced_matches(forced, tokens_ref, context.generation))
    return {"encoder": (inputs_ref, mask), "step": (hidden_ref, mask, past)}


def _time_stages(reference: _Graphs, quantized: _Graphs, inputs: dict, options: ReportOptions) -> list:
    pixels = inputs["pixels"]
    embeds, mask = inputs["encoder"]
    hidden, step_mask, past = inputs["step"]

    def step(graphs: _Graphs) -> Callable[[], object]:
        """One decode step as the runtime takes it: embed the last token, run the decoder with past."""
        return lambda: graphs.decode(graphs.embed([2]), hidden, step_mask, past)

    return [
        _timed(
            "vision_encoder",
            lambda: reference.vision(pixels),
            lambda: quantized.vision(pixels),
            options.repeats,
        ),
        _timed(
            "encoder_model",
            lambda: reference.encode(embeds, mask),
            lambda: quantized.encode(embeds, mask),
            options.repeats,
        ),
        _timed("decode_step", step(reference), step(quantized), options.decode_repeats),
    ]


def measure(
    folder: str | Path,
    variant: str,
    images: Sequence[tuple[str, Image.Image]] | None = None,
    options: ReportOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure `variant` of the export folder against its fp32 graphs, on (name, image) pairs
    (default: the shipped calibration images)."""
    folder = Path(folder)
    options = options or ReportOptions()
    progress = progress or (lambda message: None)
    images = list(images) if images is not None else calibration_images()
    manifest = read_manifest(folder)
    variants = manifest.get("variants", {})
    for name in ("fp32", variant):
        if name not in variants:
            raise InputError(f"unknown variant {name!r} in {folder}; available: {', '.join(variants)}")
    context = _Folder.read(folder, manifest, options.max_new_tokens)
    threads = options.threads or physical_cores()

    progress(f"report: loading fp32 and {variant} sessions ({threads} threads)")
    files = {name: variant_files(manifest, name) for name in ("fp32", variant)}
    reference = _Graphs(folder, files["fp32"], threads, context.layout)
    quantized = _Graphs(folder, files[variant], threads, context.layout)
    errors = {name: _Errors() for name in COMPONENTS}
    tallies = {task.task: _TaskTally() for task in options.tasks}
    inputs: dict = {}
    for image_name, image in images:
        progress(f"report: {image_name}: vision encoder and {len(options.tasks)} tasks")
        batch = context.preprocessor([image])
        pixels = batch.pixel_values
        features = reference.vision(pixels), quantized.vision(pixels)
        errors["vision_encoder"].add(*features)
        inputs.setdefault("pixels", pixels)
        for task in options.tasks:
            ids = context.prompt(task, batch.image_sizes[0])
            used = _compare_task(reference, quantized, context, features, ids, errors, tallies[task.task])
            for key, value in used.items():
                inputs.setdefault(key, value)

    progress("report: timing fp32 against the variant")
    timings = _time_stages(reference, quantized, inputs, options)
    report = Report(
        variant=variant,
        images=[name for name, _ in images],
        threads=threads,
        options=asdict(options) | {"threads": threads},
        components=_component_reports(manifest, files, variant, errors),
        tasks=[
            TaskReport(task, t.tokens, t.matches / t.tokens if t.tokens else 1.0, t.first, t.identical)
            for task, t in tallies.items()
        ],
        timings=timings,
    )
    return replace(report, flags=flags_for(report, options))


def _component_reports(manifest: dict, files: dict, variant: str, errors: dict) -> list[ComponentReport]:
    """One row per component; its size counts its graph and the external data it reads, a data
    file two graphs share (the tied embedding) counted once, with the first."""
    records = manifest.get("files", {})
    counted: dict[str, set[str]] = {variant: set(), "fp32": set()}

    def size(which: str, component: str) -> int:
        names = [files[which][component], *component_data_files(manifest, which, component)]
        fresh = [name for name in names if name not in counted[which]]
        counted[which].update(fresh)
        return sum(int(records.get(name, {}).get("size", 0)) for name in fresh)

    reports = []
    for name in COMPONENTS:
        reports.append(
            ComponentReport(
                component=name,
                dtype=manifest["variants"][variant][name].get("dtype", "?"),
                file=files[variant][name],
                size=size(variant, name),
                fp32_size=size("fp32", name),
                max_abs_error=float(errors[name].max_abs),
                mean_abs_error=float(errors[name].mean_abs),
                cosine=float(errors[name].cosine),
            )
        )
    return reports


def flags_for(report: Report, options: ReportOptions) -> list[Flag]:
    """What is wrong with a variant: accuracy flags fail the report, speed flags are told."""
    flags = []
    for task in report.tasks:
        if task.agreement < options.min_agreement:
            flags.append(
                Flag(
                    "accuracy",
                    f"{task.task}: token agreement {task.agreement:.2f} is under {options.min_agreement:.2f}",
                )
            )
    for component in report.components:
        if component.dtype != "fp32" and not component.cosine >= options.min_cosine:
            flags.append(
                Flag(
                    "accuracy",
                    f"{component.component}: output cosine similarity {component.cosine:.4f} "
                    f"is under {options.min_cosine}",
                )
            )
    half = set(report.float16_components)
    for timing in report.timings:
        if timing.variant_ms > timing.fp32_ms:
            why = (
                f" (float16: {FLOAT16_ON_CPU})" if half & set(STAGE_COMPONENTS.get(timing.stage, ())) else ""
            )
            flags.append(
                Flag(
                    "speed",
                    f"{timing.stage}: {timing.variant_ms:.1f} ms, slower than fp32's "
                    f"{timing.fp32_ms:.1f} ms{why}",
                )
            )
    return flags


# -- the table ----------------------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def format_table(report: Report) -> str:
    lines = [
        f"variant {report.variant} against fp32: {len(report.images)} images x {len(report.tasks)} tasks, "
        f"max {report.options.get('max_new_tokens')} new tokens, {report.threads} threads",
        "",
        f"{'component':<22}{'dtype':<7}{'file':<44}{'MB':>8}{'fp32 MB':>9}{'ratio':>7}"
        f"{'max abs':>10}{'mean abs':>10}{'cosine':>9}",
    ]
    for c in report.components:
        ratio = c.size / c.fp32_size if c.fp32_size else 0
        lines.append(
            f"{c.component:<22}{c.dtype:<7}{c.file:<44}{_mb(c.size):>8}{_mb(c.fp32_size):>9}{ratio:>7.1%}"
            f"{c.max_abs_error:>10.3g}{c.mean_abs_error:>10.3g}{c.cosine:>9.5f}"
        )
    ratio = report.size / report.fp32_size if report.fp32_size else 0
    lines.append(f"{'bundle':<73}{_mb(report.size):>8}{_mb(report.fp32_size):>9}{ratio:>7.1%}")
    lines += ["", f"{'task':<36}{'agreement':>10}{'first divergence':>18}{'identical':>11}{'tokens':>8}"]
    for t in report.tasks:
        first = "-" if t.first_divergence is None else str(t.first_divergence)
        lines.append(
            f"{t.task:<36}{t.agreement:>10.3f}{first:>18}{f'{t.identical}/{len(report.images)}':>11}{t.tokens:>8}"
        )
    lines += ["", f"{'time (median)':<22}{'fp32 ms':>10}{f'{report.variant} ms':>12}{'speedup':>9}"]
    for timing in report.timings:
        lines.append(
            f"{timing.stage:<22}{timing.fp32_ms:>10.1f}{timing.variant_ms:>12.1f}{timing.speedup:>8.2f}x"
        )
    lines.append("")
    if report.float16_components:
        half = ", ".join(report.float16_components)
        lines += [f"note: {half} in float16; {FLOAT16_ON_CPU}", ""]
    if report.flags:
        lines += [f"FLAG ({flag.kind}): {flag.message}" for flag in report.flags]
    lines.append("report: " + ("passed" if report.passed else "FAILED"))
    return "\n".join(lines)
