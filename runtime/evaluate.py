"""`flonnx eval FOLDER --synthetic N`: task accuracy of an export folder on held-out synthetic scenes.

Scenes come from `synthetic.make_scene(seed, i)`; their true answers are known, so every variant of
an export folder (fp32, int8, int4, ...) is scored the same way. The scoring functions take answers
from any backend: tools/train_synthetic.py scores the PyTorch model with them too.

The shuffled control scores each image's caption and boxes against another scene's truth: a model
that ignores the image scores about as well there as on the real pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import synthetic
from .errors import InputError

__all__ = [
    "METRICS",
    "Metric",
    "add_arguments",
    "box_iou",
    "evaluate",
    "main",
    "polygon_mask",
    "requests_for",
    "score",
]

DEFAULT_SEED = 12345  # training uses seed 0 (and 999 for its checks): these scenes are held out
MATCH_IOU = 0.5


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    required: float | None  # issue 6's requirement for 1-3 objects, if any
    aim: float | None


METRICS: tuple[Metric, ...] = (
    Metric("caption_exact", "<CAPTION> exact match", 0.70, 0.90),
    Metric("od_precision", "<OD> precision at IoU 0.5", 0.70, 0.90),
    Metric("od_recall", "<OD> recall at IoU 0.5", 0.70, 0.90),
    Metric("od_mean_iou", "<OD> mean IoU of matches", 0.60, 0.75),
    Metric("ocr_word", "<OCR> word accuracy", None, 0.85),
    Metric("ocr_region", "<OCR_WITH_REGION> word and quad IoU >= 0.5", None, None),
    Metric("grounding_recall", "<CAPTION_TO_PHRASE_GROUNDING> phrases at IoU 0.5", None, None),
    Metric("segmentation_iou", "<REFERRING_EXPRESSION_SEGMENTATION> mean mask IoU", None, 0.70),
    Metric("region_category", "<REGION_TO_CATEGORY> exact match", None, None),
    Metric("shuffled_caption_exact", "control: captions of shuffled images", None, None),
    Metric("shuffled_od_recall", "control: OD recall of shuffled images", None, None),
)

# A request on one scene: (task, text, region) as the runtime takes them.
Query = tuple[str, "str | None", "str | None"]


def requests_for(scene: synthetic.Scene, tasks: Sequence[str] = synthetic.TASKS) -> list[synthetic.Example]:
    """The examples of `scene` whose task is in `tasks` (one per object for the per-object tasks)."""
    return [e for e in synthetic.examples(scene) if e.task in tasks]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(predicted: list[tuple[str, list[float]]], truth: list[tuple[str, list[float]]]) -> list[float]:
    """Greedy one-to-one matching of same-label boxes by IoU (>= 0.5); the IoUs of the matches."""
    pairs = sorted(
        (
            (box_iou(p[1], t[1]), i, j)
            for i, p in enumerate(predicted)
            for j, t in enumerate(truth)
            if p[0] == t[0]
        ),
        reverse=True,
    )
    used_p, used_t, ious = set(), set(), []
    for iou, i, j in pairs:
        if iou < MATCH_IOU or i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        ious.append(iou)
    return ious


def polygon_mask(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Pixels inside any of the polygons (flat x, y lists), as a boolean [H, W] mask."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for flat in polygons:
        points = [(float(flat[k]), float(flat[k + 1])) for k in range(0, len(flat) - 1, 2)]
        if len(points) >= 3:
            draw.polygon(points, fill=255)
    return np.asarray(mask) > 0


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _od_counts(answer, scene: synthetic.Scene) -> tuple[int, int, list[float]]:
    predicted = (
        list(zip(answer.get("labels", []), answer.get("bboxes", []))) if isinstance(answer, dict) else []
    )
    truth = [(o.shape, list(o.box)) for o in scene.objects]
    return len(predicted), len(truth), _match(predicted, truth)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def score(scenes: Sequence[synthetic.Scene], answers: Sequence[Sequence]) -> dict[str, float]:
    """Metrics from each scene's answers, in the order of `requests_for(scene)` (all tasks)."""
    totals: dict[str, list[float]] = {m.name: [] for m in METRICS}
    od = {"predicted": 0, "truth": 0, "ious": []}
    by_scene_od, by_scene_caption = [], []
    for scene, scene_answers in zip(scenes, answers):
        examples = requests_for(scene)
        if len(examples) != len(scene_answers):
            raise InputError(f"{len(scene_answers)} answers for {len(examples)} requests of a scene")
        objects = iter(scene.objects)
        for example, answer in zip(examples, scene_answers):
            task = example.task
            if task == "<CAPTION>":
                by_scene_caption.append(answer)
                totals["caption_exact"].append(float(answer == example.target))
            elif task == "<OD>":
                by_scene_od.append(answer)
                n_pred, n_true, ious = _od_counts(answer, scene)
                od["predicted"] += n_pred
                od["truth"] += n_true
                od["ious"] += ious
            elif task == "<OCR>":
                totals["ocr_word"].append(float(str(answer).strip() == scene.word.text))
            elif task == "<OCR_WITH_REGION>":
                labels, quads = answer.get("labels", []), answer.get("quad_boxes", [])
                quad = scene.word.quad
                truth = [quad[0], quad[1], quad[4], quad[5]]
                hit = any(
                    label.strip() == scene.word.text and box_iou([q[0], q[1], q[4], q[5]], truth) >= MATCH_IOU
                    for label, q in zip(labels, quads)
                )
                totals["ocr_region"].append(float(hit and len(labels) == 1))
            elif task == "<CAPTION_TO_PHRASE_GROUNDING>":
                predicted = list(zip(answer.get("labels", []), answer.get("bboxes", [])))
                truth = [(synthetic._article(o.name), list(o.box)) for o in scene.objects]
                matched = len(_match(predicted, truth))
                totals["grounding_recall"] += [1.0] * matched + [0.0] * (len(truth) - matched)
            elif task == "<REFERRING_EXPRESSION_SEGMENTATION>":
                obj = next(objects)
                polygons = [p for group in answer.get("polygons", []) for p in group]
                truth = synthetic.scene_mask(obj, scene.size)
                totals["segmentation_iou"].append(_mask_iou(polygon_mask(polygons, scene.size), truth))
            elif task == "<REGION_TO_CATEGORY>":
                name = example.target
                totals["region_category"].append(float(str(answer).strip() == name))

    # The control: scene i's answers scored against scene i+1's truth (a derangement).
    n = len(scenes)
    if n > 1:
        for i in range(n):
            other = scenes[(i + 1) % n]
            totals["shuffled_caption_exact"].append(float(by_scene_caption[i] == synthetic.caption(other)))
        shuffled = [_od_counts(by_scene_od[i], scenes[(i + 1) % n]) for i in range(n)]
        totals["shuffled_od_recall"] = [_ratio(sum(len(s[2]) for s in shuffled), sum(s[1] for s in shuffled))]

    metrics = {name: float(np.mean(values)) if values else float("nan") for name, values in totals.items()}
    metrics["od_precision"] = _ratio(len(od["ious"]), od["predicted"])
    metrics["od_recall"] = _ratio(len(od["ious"]), od["truth"])
    metrics["od_mean_iou"] = float(np.mean(od["ious"])) if od["ious"] else float("nan")
    return metrics


Answerer = Callable[[list[tuple[synthetic.Scene, synthetic.Example]]], list]


def evaluate(
    answer: Answerer, count: int, seed: int = DEFAULT_SEED, chunk: int = 16, progress: bool = False
) -> tuple[dict[str, float], list[synthetic.Scene], list[list]]:
    """Score a backend on scenes 0..count-1 of `seed`. `answer` maps (scene, example) pairs to answers."""
    if count < 2:
        raise InputError(
            f"--synthetic needs at least 2 scenes (the shuffled control pairs them), got {count}"
        )
    scenes, answers = [], []
    started = time.perf_counter()
    for first in range(0, count, chunk):
        batch = [synthetic.make_scene(seed, i) for i in range(first, min(first + chunk, count))]
        pairs = [(scene, example) for scene in batch for example in requests_for(scene)]
        flat = iter(answer(pairs))
        for scene in batch:
            answers.append([next(flat) for _ in requests_for(scene)])
        scenes += batch
        if progress:
            print(f"  {len(scenes)}/{count} scenes, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return score(scenes, answers), scenes, answers


def runtime_answerer(model, max_new_tokens: int = 64) -> Answerer:
    """Answers of a loaded `Florence2`: one vision pass per scene, requests decoded in one batch."""
    from .model import Request

    def answer(pairs):
        features = {}
        for scene, _ in pairs:
            if id(scene) not in features:
                features[id(scene)] = model.encode_image(scene.image)
        requests = [Request(features[id(s)], e.task, e.text, e.region) for s, e in pairs]
        results = model.run_batch(requests, max_new_tokens=max_new_tokens)
        return [r.answer for r in results]

    return answer


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metric rows, one column per evaluated model/variant, with the issue's requirement and aim."""
    names = list(rows)
    width = max(len(m.description) for m in METRICS)
    head = f"{'metric':<{width}}  " + "  ".join(f"{n:>8}" for n in names) + "  required      aim"
    lines = [head, "-" * len(head)]
    for m in METRICS:
        values = "  ".join(f"{_pct(rows[n].get(m.name)):>8}" for n in names)
        lines.append(f"{m.description:<{width}}  {values}  {_pct(m.required):>8}  {_pct(m.aim):>7}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    if value is None:
        return ""
    if value != value:  # nan: nothing to score
        return "n/a"
    return f"{100 * value:.1f}"


def failures(metrics: dict[str, float]) -> list[str]:
    """The required metrics below their threshold (nan counts as a failure)."""
    return [
        f"{m.name} {_pct(metrics.get(m.name))} < {_pct(m.required)}"
        for m in METRICS
        if m.required is not None and not metrics.get(m.name, float("nan")) >= m.required
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="export folder (flonnx export output)")
    parser.add_argument(
        "--synthetic", type=int, required=True, metavar="N", help="score N held-out synthetic scenes"
    )
    parser.add_argument("--variant", action="append", help="variant(s) to score (default fp32); repeatable")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"scene stream (default {DEFAULT_SEED})"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a required metric is not met")


def main(args: argparse.Namespace) -> int:
    from .model import Florence2

    rows = {}
    for variant in args.variant or ["fp32"]:
        model = Florence2.load(args.folder, variant=variant, threads=args.threads)
        print(f"scoring {variant} on {args.synthetic} synthetic scenes (seed {args.seed})", file=sys.stderr)
        started = time.perf_counter()
        metrics, _, _ = evaluate(
            runtime_answerer(model, args.max_new_tokens), args.synthetic, args.seed, progress=True
        )
        metrics["seconds"] = time.perf_counter() - started
        rows[variant] = metrics
    print(format_table(rows))
    if args.json:
        clean = {n: {k: None if v != v else v for k, v in m.items()} for n, m in rows.items()}  # nan -> null
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(clean, f, indent=2)
    failed = {name: failures(metrics) for name, metrics in rows.items()}
    if args.check and any(failed.values()):
        for name, items in failed.items():
            for item in items:
                print(f"flonnx eval: {name}: {item}", file=sys.stderr)
        return 1
    return 0
