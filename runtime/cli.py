"""The `flonnx` command. Each subcommand imports its stage only when it runs, so `--help` is quick
and a missing extra is reported in one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from .errors import FlonnxError, MissingExtraError

EXIT_ERROR = 2

# Subcommand -> (module, the extra that provides it). Each module has add_arguments(parser) and main(args).
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "export": ("flonnx.export.cli", "export", "export a Florence-2 checkpoint to a validated ONNX folder"),
    "run": ("flonnx.runtime.run_cli", "runtime", "run Florence-2 tasks on images with an export folder"),
    "eval": ("flonnx.runtime.evaluate", "runtime", "score an export folder on held-out synthetic scenes"),
    "bench": ("flonnx.export.bench", "export", "time flonnx against its peers on the same random weights"),
    "quantize": (
        "flonnx.quantize.cli",
        "quantize",
        "add int8 / int4 / fp16 / q4f16 variants to an export folder, with a report",
    ),
    "info": ("flonnx.runtime.info", "runtime", "what this machine offers, or what a model folder holds"),
    "pack": ("flonnx.pack.cli", "pack", "pack a variant for a device: a browser page or ONNX Runtime Mobile"),
    "serve": ("flonnx.serve.cli", "serve", "serve an export folder over HTTP, batching concurrent requests"),
    "loadtest": ("flonnx.serve.loadtest", "serve", "load-test a running flonnx server on this machine"),
    "label": (
        "flonnx.label.cli",
        "label",
        "label many images: COCO JSON and JSONL, resumable, on one machine or Ray",
    ),
}

# Imports a stage needs, mapped to the extra that installs them.
EXTRA_OF_MODULE = {
    "torch": "export",
    "transformers": "export",
    "onnxscript": "export",
    "onnx": "quantize",
    "fastapi": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "prometheus_client": "serve",
    "multipart": "serve",
    "ray": "ray",
    "pyarrow": "label",
}


def _load(module_name: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing in EXTRA_OF_MODULE:
            raise MissingExtraError(extra, missing) from None
        raise


def _parser(add_arguments: Callable[[str, argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flonnx", description="Florence-2 on CPUs and devices through ONNX."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"flonnx {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, summary) in SUBCOMMANDS.items():
        add_arguments(name, commands.add_parser(name, help=summary, description=summary))
    return parser


def _version() -> str:
    from .info import version

    return version()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"flonnx: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _one_line_warning
    debug = "--debug" in argv
    modules = {}

    def add_arguments(name: str, sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        # Only the chosen subcommand's module is imported: the others stay unloaded.
        if name in argv:
            module_name, extra, _ = SUBCOMMANDS[name]
            try:
                modules[name] = _load(module_name, extra)
            except MissingExtraError as error:
                # whatever arguments follow, the answer is which extra to install
                modules[name] = error
                sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
                return
            modules[name].add_arguments(sub)
        else:
            sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    try:
        parser = _parser(add_arguments)
        args, unknown = parser.parse_known_args(argv)
        module = modules.get(args.command)
        if isinstance(module, BaseException):
            raise module  # a missing extra, whatever arguments came with it
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return int(module.main(args) or 0)
    except FlonnxError as error:
        if debug:
            raise
        print(f"flonnx {argv[0] if argv else ''}: error: {error}".replace("  ", " "), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("flonnx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
