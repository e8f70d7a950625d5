"""`flonnx pack FOLDER --target mobile`: progress on stderr, a summary on stdout. Exit status: 0, or
1 when the check found the pack computing other answers than the source variant (the pack is
written; its README and flonnx.json say what differs), or 2 on an error."""

from __future__ import annotations

import argparse

import onnx  # noqa: F401  the pack extra: when it is missing, flonnx's CLI names the extra to install

from .check import check_line, same_answers_line
from .packer import TARGETS

EXIT_CHECK_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="an export folder (flonnx export, flonnx quantize)")
    parser.add_argument("--target", help=f"what to pack for: {', '.join(TARGETS)}")
    parser.add_argument("--variant", help="the variant to pack (default: int8 if listed, else fp32)")
    parser.add_argument(
        "--out", help="the pack folder to write (default: FOLDER-TARGET-VARIANT[-static] beside FOLDER)"
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help="fix the vision encoder's input to one image of the model's size (NPUs, static-shape providers)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument(
        "--no-check", action="store_true", help="do not run the pack against the source variant"
    )
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads for the check (default: physical cores)"
    )
    parser.add_argument(
        "--node-modules",
        help="web: the node_modules folder with the pinned transformers.js the page is built from "
        "(default: flonnx's js/node_modules)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="web: serve the pack (FOLDER itself when it is a web pack and --target is not given) with "
        "the headers WebAssembly threads need, until Ctrl-C",
    )
    parser.add_argument("--host", default="127.0.0.1", help="--serve: the address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="--serve: the port (default: 8000; 0: any)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def summary(result) -> str:
    details = result.manifest["pack"]
    files = result.manifest["files"]
    lines = [f"{result.folder}: variant {result.variant!r}, {details['format']}"]
    for component, entry in result.manifest["variants"][result.variant].items():
        sized = details["sizes"]["per_component"][component]
        reads = sized["source_reads"]
        size = sized["graph"] + sized["data"] if "graph" in sized else files[entry["file"]]["size"]
        lines.append(f"  {entry['file']:<46} {size / 1e6:8.1f} MB  (source reads {reads / 1e6:.1f} MB)")
    sizes = details["sizes"]
    lines.append(
        f"  graphs {sizes['pack_graphs'] / 1e6:.1f} MB, source variant {sizes['source_variant'] / 1e6:.1f} "
        f"MB; tables stored twice: {details['duplicated_bytes'] / 1e6:.1f} MB"
    )
    if "operators" in details:
        operators = details["operators"]
        domains = ", ".join(f"{d} {len(ops)}" for d, ops in operators["by_domain"].items())
        lines.append(f"  {operators['config']}: {operators['operators']} operators ({domains})")
    if details.get("static"):
        lines.append(f"  static shapes: {details['static']}")
    for warning in details.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if details.get("check"):
        describe = same_answers_line if details["target"] == "web" else check_line
        lines.append(f"  {describe(details['check'])}")
    if details["target"] == "web":
        lines.append(f"  open it: flonnx pack {result.folder} --serve")
    return "\n".join(lines)


def serve(folder, host: str, port: int) -> None:
    from .serve import make_server, url_of

    server = make_server(folder, host, port)
    print(f"serving {folder} at {url_of(server)} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(args: argparse.Namespace) -> int:
    from flonnx.runtime.errors import InputError

    from .folder import Progress
    from .packer import pack

    if args.target is None:
        if not args.serve:
            raise InputError(f"--target is required: one of {', '.join(TARGETS)} (or --serve a web pack)")
        serve(args.folder, args.host, args.port)
        return 0
    if args.serve and args.target != "web":
        raise InputError(f"--serve serves a web pack; --target is {args.target!r}")
    result = pack(
        args.folder,
        args.target,
        variant=args.variant,
        out=args.out,
        static=args.static,
        force=args.force,
        check=not args.no_check,
        threads=args.threads,
        node_modules=args.node_modules,
        progress=Progress(quiet=args.quiet),
    )
    print(summary(result), flush=True)
    if args.serve:
        serve(result.folder, args.host, args.port)
    return 0 if result.passed else EXIT_CHECK_FAILED
