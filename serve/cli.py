"""`flonnx serve FOLDER`: the HTTP API on uvicorn, or with --ray as a Ray Serve application."""

from __future__ import annotations

import argparse
import socket
import sys
import warnings

from flonnx.runtime.errors import InputError

from .settings import ServeSettings

DEFAULTS = ServeSettings()


def _dtype(value: str):
    from flonnx.runtime.folder import parse_dtype

    try:
        return parse_dtype(value)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("folder", metavar="FOLDER", help="an export folder (flonnx export) or onnx-community")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--variant", help="a variant listed in flonnx.json, e.g. int8 (default fp32)")
    choice.add_argument(
        "--dtype", type=_dtype, help="transformers.js dtype, or one per component (as flonnx run)"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: physical cores)")
    parser.add_argument(
        "--host", default=d.host, help=f"address to bind (default {d.host}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0: any free port)")
    group = parser.add_argument_group("batching and limits")
    group.add_argument(
        "--batch-window-ms",
        type=float,
        default=d.batch_window_ms,
        help=f"wait this long for more requests to batch with (default {d.batch_window_ms:g})",
    )
    group.add_argument(
        "--max-batch", type=int, default=d.max_batch, help=f"rows per batch (default {d.max_batch})"
    )
    group.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help=f"rows waiting before 503 (default {d.queue_size})",
    )
    group.add_argument(
        "--deadline",
        type=float,
        default=d.deadline_s,
        help=f"seconds per request before 504 (default {d.deadline_s:g})",
    )
    group.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_bytes / 2**20,
        help=f"request body limit in MiB (default {d.max_upload_bytes / 2**20:g})",
    )
    group.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help=f"pixels per image (default {d.max_pixels:,})"
    )
    group.add_argument(
        "--max-images", type=int, default=d.max_images, help=f"per request (default {d.max_images})"
    )
    group.add_argument(
        "--max-tasks", type=int, default=d.max_tasks, help=f"per request (default {d.max_tasks})"
    )
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"cap on max_new_tokens (default {d.max_new_tokens})",
    )
    group.add_argument(
        "--max-num-beams",
        type=int,
        default=d.max_num_beams,
        help=f"cap on num_beams (default {d.max_num_beams})",
    )
    group.add_argument(
        "--vision-batch",
        type=int,
        default=d.vision_batch,
        help=f"images per vision encoder run (default {d.vision_batch}: batching it is no faster on CPU)",
    )
    group.add_argument(
        "--cache-mb",
        type=float,
        default=d.cache_mb,
        help=f"image-feature cache, 0: off (default {d.cache_mb:g})",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        help=f"seconds in-flight requests get at shutdown (default {d.drain_timeout_s:g})",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = parser.add_argument_group("Ray Serve (extra 'ray')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="serve as a Ray Serve application: on a new local Ray instance, or on the cluster at ADDRESS",
    )
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default 1)")


def settings_from(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        host=args.host,
        port=args.port,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        deadline_s=args.deadline,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_tasks=args.max_tasks,
        max_new_tokens=args.max_new_tokens,
        max_num_beams=args.max_num_beams,
        vision_batch=args.vision_batch,
        cache_mb=args.cache_mb,
        drain_timeout_s=args.drain_timeout,
    )


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    variant = args.dtype or args.variant
    if not settings.loopback:
        warnings.warn(
            f"listening on {settings.host}: the API has no authentication; put it behind a proxy that has",
            stacklevel=1,
        )
    if args.ray:
        from .ray_app import serve_forever

        return serve_forever(args.folder, settings, variant, args.threads, args.ray, args.replicas)

    import uvicorn

    from flonnx.runtime import Florence2

    from .app import create_app

    model = Florence2.load(args.folder, variant=variant, threads=args.threads)
    app = create_app(model, settings)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server((settings.host, settings.port), family=family)
    except OSError as error:
        raise InputError(f"cannot listen on {settings.host}:{settings.port}: {error.strerror}") from None
    port = sock.getsockname()[1]
    print(f"flonnx serve: {model.folder} ({model.variant}) on http://{settings.host}:{port}", file=sys.stderr)
    config = uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
