"""`flonnx run FOLDER IMAGE... --task T`: one JSON object per image and task on stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InputError


def region_argument(value: str) -> list[float]:
    parts = value.replace(" ", "").split(",")
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"expected x1,y1,x2,y2 in pixels, got {value!r}")
    return box


def dtype_argument(value: str):
    from .folder import parse_dtype

    try:
        return parse_dtype(value)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--task, --text, --region, --variant/--dtype, --max-new-tokens, --num-beams: as `flonnx run`
    takes them (`flonnx label` too)."""
    parser.add_argument(
        "--task", action="append", required=True, help='a task token, e.g. "<OD>"; repeatable'
    )
    parser.add_argument("--text", help="input text for the tasks that take text (phrase grounding, ...)")
    parser.add_argument(
        "--region", type=region_argument, help="x1,y1,x2,y2 pixel box for the REGION_TO_* tasks"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--variant", help="a variant listed in flonnx.json, e.g. int8 (default fp32, or the only one listed)"
    )
    choice.add_argument(
        "--dtype",
        type=dtype_argument,
        help="transformers.js dtype: fp32, fp16, q8, int8, uint8, q4, q4f16, bnb4; or per component, "
        "e.g. vision_encoder=fp16,decoder_model_merged=q4 (the rest fp32)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="override generation_config.json's length")
    parser.add_argument("--num-beams", type=int, help="beam width, 1: greedy (default: generation_config)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folder", metavar="FOLDER", help="an export folder (flonnx export) or an onnx-community folder"
    )
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    add_task_arguments(parser)
    parser.add_argument("--do-sample", action="store_true", help="sample; with num_beams > 1, beam-sample")
    parser.add_argument("--seed", type=int, help="seed for --do-sample: the same seed, the same output")
    parser.add_argument("--scores", action="store_true", help='add per-box "scores" to answers with boxes')
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--draw", metavar="OUT.png", help="draw the results onto a copy of the image")
    parser.add_argument("--verbose", action="store_true", help="add stage timings to each result")


def _draw_path(template: str, image: str, count: int) -> Path:
    path = Path(template)
    return path if count == 1 else path.with_name(f"{path.stem}-{Path(image).stem}{path.suffix or '.png'}")


def main(args: argparse.Namespace) -> int:
    from .draw import draw_results
    from .model import Florence2, Request
    from .preprocess import load_image

    started = time.perf_counter()
    variant = args.dtype or args.variant  # None: fp32, or the folder's only variant
    model = Florence2.load(args.folder, variant=variant, threads=args.threads)
    loaded = time.perf_counter() - started
    model.tasks.check_inputs(args.task, args.text, args.region)
    with_input = set(model.tasks.prompts_with_input)
    for image_path in args.images:
        timings: dict = {}
        image = load_image(image_path)
        features = model.encode_images([image], timings)[0]
        requests = []
        for task in args.task:
            takes_input = task in with_input
            region = args.region if takes_input and task in model.tasks.region_tasks else None
            text = args.text if takes_input and region is None else None
            requests.append(Request(features, task, text, region))
        results = model.run_batch(
            requests,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            do_sample=True if args.do_sample else None,
            seed=args.seed,
            scores=args.scores,
            timings=timings,
        )
        for result in results:
            record = {"image": image_path, **result.as_dict()}
            if args.verbose:
                record["timings"] = {"load": round(loaded, 4), **{k: round(v, 4) for k, v in timings.items()}}
            print(json.dumps(record), flush=True)
        if args.draw:
            path = _draw_path(args.draw, image_path, len(args.images))
            try:
                draw_results(image, [r.as_dict() for r in results]).save(path)
            except (OSError, ValueError) as error:
                raise InputError(f"cannot write --draw {path}: {error}") from None
            print(f"drew {path}", file=sys.stderr)
    return 0
