"""`flonnx quantize FOLDER --recipe NAME`: add a quantized variant to an export folder, with a report.

Progress goes to stderr, the report table to stdout. Exit status: 0 when the report passed, 1 when
it flagged an accuracy problem (the variant stays listed, with its report), 2 on an error.
"""

from __future__ import annotations

import argparse

from .recipes import DTYPES, RECIPES, parse_overrides

EXIT_REPORT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="an export folder (flonnx export)")
    parser.add_argument("--recipe", required=True, metavar="NAME", help=f"one of: {', '.join(RECIPES)}")
    parser.add_argument(
        "--keep",
        action="append",
        metavar="COMPONENT=DTYPE",
        help=f"put one component at another dtype ({', '.join(DTYPES)}), e.g. vision_encoder=fp32; "
        "repeatable",
    )
    parser.add_argument("--variant", help="variant name in flonnx.json (default: the recipe's name)")
    parser.add_argument("--images", nargs="+", metavar="IMAGE", help="calibration images (default: shipped)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per task (default 32)")
    parser.add_argument(
        "--min-agreement", type=float, default=0.9, help="token agreement under this fails the report (0.9)"
    )
    parser.add_argument(
        "--min-cosine", type=float, default=0.99, help="component cosine under this fails the report (0.99)"
    )
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads for the report (default: physical cores)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args: argparse.Namespace) -> int:
    from .report import ReportOptions
    from .stage import Progress, quantize

    options = ReportOptions(
        max_new_tokens=args.max_new_tokens,
        min_agreement=args.min_agreement,
        min_cosine=args.min_cosine,
        threads=args.threads,
    )
    result = quantize(
        args.folder,
        args.recipe,
        keep=parse_overrides(args.keep),
        variant=args.variant,
        images=args.images,
        options=options,
        progress=Progress(quiet=args.quiet),
    )
    print(result.report.table(), flush=True)
    return 0 if result.report.passed else EXIT_REPORT_FAILED
