"""`flonnx export SRC OUT`."""

from __future__ import annotations

import argparse

from .exporter import DEFAULT_IMAGE_SIZE, Progress, export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="a native Florence-2 checkpoint: local folder or hub id")
    parser.add_argument("out", metavar="OUT", help="the export folder to write")
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"input resolution, a multiple of 32 (default {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args: argparse.Namespace) -> int:
    export(
        args.src, args.out, image_size=args.image_size, force=args.force, progress=Progress(quiet=args.quiet)
    )
    return 0
