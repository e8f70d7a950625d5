"""`flonnx label SRC OUT --model FOLDER --task T`: label images into COCO JSON and JSONL, resumably."""

from __future__ import annotations

import argparse

from flonnx.runtime.run_cli import add_task_arguments

from .local import POOLS
from .runner import DEFAULT_BATCH_SIZE, DEFAULT_POOL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        help="a folder of images (searched recursively), a list file (one path per line), "
        "or a .jsonl / .parquet manifest of image paths",
    )
    parser.add_argument(
        "out",
        metavar="OUT",
        help="output folder: labels.jsonl, errors.jsonl, coco-<task>.json; run again to resume",
    )
    parser.add_argument("--model", required=True, metavar="FOLDER", help="an export folder (flonnx export)")
    add_task_arguments(parser)
    parser.add_argument("--column", help="the manifest's key or column holding image paths (default: path)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per run_batch call (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--workers", type=int, help="workers (default: cores / threads; on Ray: cluster CPUs / threads)"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime threads per worker (default 1)")
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default=DEFAULT_POOL,
        help=f"local workers: threads sharing one model, or processes with one each (default {DEFAULT_POOL})",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="run on Ray Data: a running cluster (RAY_ADDRESS, `ray start`) or else a local instance; "
        "or the cluster at ADDRESS (auto, host:port, ray://host:port). Needs the 'ray' extra",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="label again the images listed in errors.jsonl",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def main(args: argparse.Namespace) -> int:
    from flonnx.runtime.staging import Progress

    from .runner import label

    label(
        args.src,
        args.out,
        args.model,
        args.task,
        text=args.text,
        region=args.region,
        variant=args.dtype or args.variant,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        column=args.column,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        pool=args.pool,
        ray=args.ray,
        retry_errors=args.retry_errors,
        progress=Progress(quiet=args.quiet),
    )
    return 0
