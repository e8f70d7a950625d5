"""The same serving core as a Ray Serve application (extra 'ray').

Each replica loads the model and serves the FastAPI app of `create_app` (batcher, cache, limits
and metrics included), so a request gets the same answer and the same errors as from
`flonnx serve`. Ray Serve routes requests to replicas; batching happens inside each replica.

    flonnx serve FOLDER --ray                  # a local Ray instance
    flonnx serve FOLDER --ray auto --replicas 4  # the running cluster
    serve run flonnx.serve.ray_app:app folder=FOLDER variant=int8 threads=2
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import asdict, fields

from ray import serve

from flonnx.runtime.errors import InputError

from .settings import ServeSettings


@serve.ingress()
class Florence2Deployment:
    """One replica: the model and its app, built in the replica process, never pickled."""

    def __init__(self, folder: str, settings: dict, variant, threads: int | None):
        from flonnx.runtime import Florence2

        from .app import create_app

        self._app = create_app(
            Florence2.load(folder, variant=variant, threads=threads), ServeSettings(**settings)
        )

    def __serve_build_asgi_app__(self):
        return self._app


def application(
    folder: str,
    settings: ServeSettings | None = None,
    variant=None,
    threads: int | None = None,
    replicas: int = 1,
):
    """A bound Ray Serve application; `serve.run(application(...))` starts it."""
    settings = settings or ServeSettings()
    if not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas must be a positive integer, got {replicas!r}")
    deployment = serve.deployment(
        Florence2Deployment,
        name="flonnx",
        num_replicas=replicas,
        # a replica uses as many cores as its onnxruntime threads
        ray_actor_options={"num_cpus": threads or 1},
        # Ray's default (5) would cap what reaches the batcher; its own queue bounds the rest
        max_ongoing_requests=settings.queue_size + settings.max_batch,
    )
    return deployment.bind(str(folder), asdict(settings), variant, threads)


def app(args: dict[str, str]):
    """Builder for `serve run flonnx.serve.ray_app:app folder=... [variant=...] [threads=N]
    [replicas=N] [any ServeSettings field=value]`."""
    args = dict(args)
    if "folder" not in args:
        raise InputError("serve run needs folder=FOLDER")
    folder = args.pop("folder")
    variant = args.pop("variant", None)
    threads = int(args.pop("threads")) if "threads" in args else None
    replicas = int(args.pop("replicas", 1))
    types = {f.name: f.type for f in fields(ServeSettings)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        valid = ", ".join(["folder", "variant", "threads", "replicas", *types])
        raise InputError(f"unknown argument {', '.join(unknown)}; valid: {valid}")
    converted = {name: _convert(types[name], value) for name, value in args.items()}
    return application(folder, ServeSettings(**converted), variant, threads, replicas)


def _convert(kind: str, value: str):
    return int(value) if kind == "int" else float(value) if kind == "float" else value


def serve_forever(
    folder: str, settings: ServeSettings, variant, threads: int | None, address: str, replicas: int
) -> int:
    """`flonnx serve --ray`: start (or join) Ray, run the application, wait for Ctrl+C or SIGTERM."""
    import ray

    ray.init(address=None if address == "local" else address, include_dashboard=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(folder, settings, variant, threads, replicas), name="flonnx", route_prefix="/")
        print(
            f"flonnx serve: {folder} on Ray Serve at http://{settings.host}:{settings.port}", file=sys.stderr
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
