"""`create_app(model, settings)`: the FastAPI app of `flonnx serve`.

The event loop only moves bytes: reading bodies, decoding images and checking prompts run in
worker threads (`prepare`), inference on the batcher's thread, so /health and /metrics answer
while a batch runs. A request waits for its rows together with its client's connection: a client
that goes away before its answer frees its queued rows (counted as status 499).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from flonnx.runtime import Florence2

from .engine import Engine, message_of, status_of
from .inputs import GENERATION_FIELDS, RawJob, RunBody, RunOptions, ServeError, parse_form, parse_json
from .metrics import CLIENT_CLOSED
from .settings import ServeSettings

log = logging.getLogger("flonnx.serve")
# How much of an oversized body is still read (and dropped) so the client sees the 413 instead of
# a reset connection; past it the connection is closed.
DISCARD_BYTES = 64 * 1024 * 1024
IMAGE_FIELDS = ("image", "images")


class RunResponse(BaseModel):
    results: list[list[dict[str, Any]]]  # per image, per task: what Florence2.run returns
    timings: dict[str, float]


class ErrorResponse(BaseModel):
    detail: str


def create_app(model: Florence2, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    engine = Engine(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has already waited for in-flight requests; this finishes anything still queued
        await asyncio.to_thread(engine.close, settings.drain_timeout_s)

    app = FastAPI(
        title="flonnx",
        summary="Florence-2 on CPUs through ONNX",
        description=(
            "POST an image and one or more Florence-2 tasks to /v1/run; answers are the dicts "
            "Florence2.run returns. Concurrent requests are batched."
        ),
        lifespan=lifespan,
    )
    app.state.engine = engine
    _install_schemas(app)

    @app.post(
        "/v1/run",
        response_model=RunResponse,
        responses={code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 500, 503, 504)},
        openapi_extra=_request_body_schema(),
        summary="Run tasks on one or more images",
    )
    async def run(request: Request) -> Response:
        started = time.monotonic()
        engine.metrics.in_flight.inc()
        status = 500
        try:
            with engine.batcher.incoming():
                raw = await _read_job(request, settings)
                job = await run_in_threadpool(engine.prepare, raw)
                futures = engine.submit(job)
            outcomes = await _wait(futures, request, started + job.timeout_s)
            status = 200
            return JSONResponse(engine.respond(job, outcomes, time.monotonic() - started))
        except (_ClientGone, ClientDisconnect):
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        except Exception as error:  # every failure becomes a JSON answer; the server goes on
            status = status_of(error)
            if status == 500:
                log.error("POST /v1/run failed", exc_info=error)
            headers = error.headers if isinstance(error, ServeError) else {}
            return JSONResponse({"detail": message_of(error)}, status_code=status, headers=headers)
        finally:
            engine.metrics.in_flight.dec()
            engine.metrics.requests.labels(str(status)).inc()
            if status == 200:
                engine.metrics.request_seconds.observe(time.monotonic() - started)

    @app.get("/health", summary="200 while the server takes requests, 503 when it does not")
    async def health() -> JSONResponse:
        body = {"status": "ok" if engine.healthy else "unavailable", "queue_depth": engine.batcher.depth}
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/info", summary="The model, its tasks and this server's limits")
    async def info() -> dict:
        tasks = model.tasks
        return {
            "model": str(model.folder),
            "variant": model.variant,
            "tasks": {task: _input_of(task, tasks) for task in tasks.tasks},
            "generation": {
                k: v for k, v in asdict(model.generation_options()).items() if k in GENERATION_FIELDS
            },
            "limits": settings.limits(),
        }

    return app


class _ClientGone(Exception):
    pass


def _input_of(task: str, tasks) -> str | None:
    """What a task takes besides the image: "text", "region" or nothing."""
    if task in tasks.region_tasks:
        return "region"
    return "text" if task in tasks.prompts_with_input else None


async def _read_job(request: Request, settings: ServeSettings) -> RawJob:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data"):
        raise ServeError(
            415,
            f"Content-Type must be multipart/form-data or application/json, got {content_type or 'none'!r}",
        )
    body = await _read_body(request, settings.max_upload_bytes)
    if content_type == "application/json":
        return await run_in_threadpool(parse_json, body)
    return await _parse_multipart(request, body, settings)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    chunks, total = [], 0
    too_large = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            too_large = True
        if too_large:
            if total > DISCARD_BYTES:
                break
            continue
        chunks.append(chunk)
    if too_large:
        size = f"{int(declared):,} bytes" if declared.isdigit() else f"more than {limit:,} bytes"
        raise ServeError(
            413, f"the body is {size}; this server takes at most {limit:,} bytes (max_upload_bytes)"
        )
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes, settings: ServeSettings) -> RawJob:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=settings.max_images + 1, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ServeError(400, f"malformed multipart body: {error.message}") from None
    try:
        files, values, tasks = [], {}, []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in IMAGE_FIELDS:
                    raise ServeError(422, f"file field {name!r} is not known; send images under 'image'")
                files.append(await value.read())
            elif name in ("task", "tasks"):
                tasks.append(value)
            elif name in IMAGE_FIELDS:
                raise ServeError(
                    422, f"{name!r} must be a file upload in multipart requests (base64 is for JSON)"
                )
            else:
                values[name] = value
    finally:
        await form.close()
    if tasks:
        values["tasks"] = tasks
    return await run_in_threadpool(parse_form, files, values)


async def _wait(futures: list, request: Request, deadline: float) -> list:
    """The rows' outcomes, or 504 at the deadline, or _ClientGone when the client disconnects;
    either way the rows not yet running are cancelled and never run."""
    gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {gathered, gone}, timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
        )
        if gathered in done:
            return gathered.result()
        if gone in done:
            raise _ClientGone()
        raise ServeError(
            504, "no answer within the request's deadline; its rows that had not started were dropped"
        )
    finally:
        gone.cancel()
        if not gathered.done():
            gathered.cancel()
            for future in futures:
                future.cancel()
            # its CancelledError is expected: retrieve it so asyncio does not log it
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _disconnected(request: Request) -> None:
    # After the body, the next ASGI message is http.disconnect: the client closed the connection.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _request_body_schema() -> dict:
    """Both encodings of POST /v1/run in the OpenAPI document (the handler reads the body itself)."""
    options = RunOptions.model_json_schema()["properties"]
    form = {
        "type": "object",
        "required": ["image", "task"],
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "task": {"type": "array", "items": {"type": "string"}, "description": 'task tokens, e.g. "<OD>"'},
            "text": {"type": "string"},
            "region": {"type": "string", "description": "x1,y1,x2,y2 in pixels, or four <loc_N> tokens"},
            **options,
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": {"$ref": "#/components/schemas/RunBody"}},
            },
        }
    }


def _install_schemas(app: FastAPI) -> None:
    """Put RunBody (referenced by the request body above) into the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # FastAPI keeps it in app.openapi_schema
            body = RunBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["RunBody"] = body
        return app.openapi_schema

    app.openapi = openapi
