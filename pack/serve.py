"""Serve a web pack on this machine (`flonnx pack PACK --serve`): the standard library's static file
server with the headers the page needs. onnxruntime-web runs on several threads only where the page
is cross-origin isolated (SharedArrayBuffer), which takes `Cross-Origin-Opener-Policy: same-origin`
and `Cross-Origin-Embedder-Policy: require-corp`; `.mjs` and `.wasm` need their JavaScript and
WebAssembly types (streaming compilation refuses other types), which not every system's MIME table
has. Loopback by default: the page is for the person at this machine.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flonnx.runtime.errors import InputError

from .folder import PackError
from .web import MODEL_DIR, PAGE_FILES

HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def end_headers(self) -> None:
        for name, value in HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:  # type: ignore[attr-defined]
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        # transformers.js probes a file's size with a ranged GET and drops the connection once it has
        # the headers: a reset peer is normal here, not an error worth a traceback
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def check_web_pack(folder: str | Path) -> Path:
    """The folder, if it is a web pack (`flonnx pack --target web` wrote it)."""
    folder = Path(folder)
    manifest = folder / MODEL_DIR / "flonnx.json"
    missing = [name for name in PAGE_FILES if not (folder / name).is_file()]
    if not folder.is_dir() or missing or not manifest.is_file():
        raise PackError(
            f"{folder} is not a web pack (no {', '.join(missing) or manifest.name}): "
            f"make one with `flonnx pack MODEL --target web`"
        )
    target = json.loads(manifest.read_text()).get("pack", {}).get("target")
    if target != "web":
        raise PackError(f"{folder} is a {target!r} pack, not a web pack")
    return folder


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
    """A ThreadingHTTPServer for the pack (port 0: any free port; `server.server_address` says which)."""
    folder = check_web_pack(folder)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputError(f"port must be a whole number from 0 to 65535, got {port!r}")
    handler = functools.partial(_Handler, directory=str(folder.resolve()))
    try:
        server = _Server((host, port), handler)
    except OSError as error:
        raise PackError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


def url_of(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve_in_thread(folder: str | Path, host: str = "127.0.0.1", port: int = 0):
    """Start serving in a daemon thread; returns the server (`.shutdown()` stops it)."""
    server = make_server(folder, host, port)
    threading.Thread(target=server.serve_forever, name="flonnx-web-pack", daemon=True).start()
    return server
