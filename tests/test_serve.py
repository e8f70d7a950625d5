"""`flonnx serve` over real HTTP on loopback: answers equal Florence2.run, batching, the feature
cache, backpressure (503), deadlines (504), limits (413), bad input (4xx), /health and /metrics
under load, disconnects, graceful shutdown, the CLI, and `flonnx loadtest` against it.

A "gated" model (run_batch held until the test opens the gate) makes the worker busy on demand,
so queueing, deadlines and shutdown are tested on events, not on timing."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from flonnx.runtime import cli  # noqa: E402
from flonnx.runtime.errors import InputError  # noqa: E402
from flonnx.runtime.model import Florence2  # noqa: E402
from flonnx.serve.app import create_app  # noqa: E402
from flonnx.serve.batcher import Batcher, Row  # noqa: E402
from flonnx.serve.loadtest import LoadPlan, parse_metrics  # noqa: E402
from flonnx.serve.settings import ServeSettings  # noqa: E402

TOKENS = 12  # max_new_tokens: the random tiny model would otherwise talk for a long time
GREEDY = {"max_new_tokens": TOKENS, "num_beams": 1}
WAIT = 30.0  # seconds any event may take on a loaded 2-core machine before the test fails


def _png(seed: int, size=(96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_equal(value):
    """What an answer looks like after JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def model(tiny_export_dir) -> Florence2:
    return Florence2.load(tiny_export_dir, threads=2)


@pytest.fixture(scope="module")
def shared_url(model) -> Iterator[str]:
    """One server with default settings for the tests that need nothing else."""
    with serving(model) as (url, _, _):
        yield url


class Gate:
    """The model with run_batch held until `release()`: a busy worker when a test wants one."""

    def __init__(self, model: Florence2):
        self._model = model
        self.entered = threading.Event()
        self._open = threading.Event()
        self.batches: list[list] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def run_batch(self, requests, **options):
        self.batches.append(list(requests))
        self.entered.set()
        if not self._open.wait(WAIT):
            raise RuntimeError("the test never opened the gate")
        return self._model.run_batch(requests, **options)

    def release(self) -> None:
        self._open.set()


class _Server(uvicorn.Server):
    def __init__(self, config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        self.ready.set()


@contextmanager
def serving(model, **settings) -> Iterator[tuple[str, _Server, object]]:
    """The app on uvicorn in a thread, on a free loopback port: (url, server, app)."""
    app = create_app(model, ServeSettings(**settings))
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=WAIT))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert server.ready.wait(WAIT), "uvicorn did not start"
    try:
        yield url, server, app
    finally:
        if isinstance(model, Gate):
            model.release()  # a failed test must not leave the worker blocked
        server.should_exit = True
        thread.join(WAIT)


def _wait_until(condition, what: str) -> None:
    """Wait for a condition another thread brings about (polled; fails after WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _post(url: str, image: bytes, tasks, timeout: float = WAIT, **fields) -> httpx.Response:
    data = {"task": list(tasks), **{k: str(v) for k, v in fields.items()}}
    files = {"image": ("image.png", image, "image/png")}
    return httpx.post(f"{url}/v1/run", data=data, files=files, timeout=timeout)


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=WAIT).text)


# -- answers ---------------------------------------------------------------------------------------


def test_answers_equal_florence2_run(model, shared_url):
    url = shared_url
    image = _png(0, (120, 90))
    cases = [
        ("<CAPTION>", None, None),
        ("<OD>", None, None),
        ("<CAPTION_TO_PHRASE_GROUNDING>", "a small dog", None),
        ("<REGION_TO_CATEGORY>", None, [10.0, 20.0, 80.0, 70.0]),
    ]
    for task, text, region in cases:
        fields = dict(GREEDY)
        if text:
            fields["text"] = text
        if region:
            fields["region"] = ",".join(str(v) for v in region)
        response = _post(url, image, [task], **fields)
        assert response.status_code == 200, response.text
        expected = model.run(image, task, text=text, region=region, **GREEDY)
        assert response.json()["results"] == [[_json_equal(expected)]]
    # JSON with base64, two images x two tasks, the model's own decoding options (beam search)
    images = [_png(1), _png(2, (50, 70))]
    body = {"images": [base64.b64encode(i).decode() for i in images], "tasks": ["<CAPTION>", "<OD>"]}
    body["max_new_tokens"] = TOKENS
    response = httpx.post(f"{url}/v1/run", json=body, timeout=WAIT)
    assert response.status_code == 200, response.text
    expected = [[_json_equal(model.run(i, t, max_new_tokens=TOKENS)) for t in body["tasks"]] for i in images]
    assert response.json()["results"] == expected
    timings = response.json()["timings"]
    assert timings["total_s"] >= timings["run_s"] > 0 and timings["batch_size"] == 4


def test_concurrent_requests_batch_and_answer_as_alone(model):
    """Rows queued behind a busy worker run as one batch; each answer equals Florence2.run (fp32)."""
    gate = Gate(model)
    images = [_png(10 + i, (64 + 8 * i, 64)) for i in range(5)]
    tasks = ["<CAPTION>", "<OD>", "<CAPTION>", "<OD>"]
    with serving(gate, batch_window_ms=0) as (url, _, app), ThreadPoolExecutor(6) as pool:
        first = pool.submit(_post, url, images[0], ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        queued = [pool.submit(_post, url, images[i + 1], [tasks[i]], **GREEDY) for i in range(4)]
        # a different max_new_tokens cannot share their batch
        other = pool.submit(_post, url, images[0], ["<OD>"], max_new_tokens=TOKENS - 2, num_beams=1)
        _wait_until(lambda: app.state.engine.batcher.depth == 5, "5 rows in the queue")
        gate.release()
        answers = [f.result() for f in [first, *queued, other]]
    assert [r.status_code for r in answers] == [200] * 6
    # the first alone (it found the worker idle), then the four together and the other one alone
    assert [len(batch) for batch in gate.batches[:1]] == [1]
    assert sorted(len(batch) for batch in gate.batches[1:]) == [1, 4]
    for image, task, response in zip(images[1:], tasks, answers[1:5]):
        assert response.json()["results"] == [[_json_equal(model.run(image, task, **GREEDY))]]
        assert response.json()["timings"]["batch_size"] == 4
    expected = model.run(images[0], "<OD>", max_new_tokens=TOKENS - 2, num_beams=1)
    assert answers[5].json()["results"] == [[_json_equal(expected)]]


def test_batcher_waits_for_a_request_still_being_read():
    """With no window at all, a queued row still waits for a request that is being decoded, so
    a closed loop of clients does not split into alternating half batches."""
    sizes = []

    def process(rows):
        sizes.append(len(rows))
        for row in rows:
            row.future.set_result(None)

    batcher = Batcher(process, window_s=0.0, max_batch=8, queue_size=8)
    batcher.start()
    with batcher.incoming():
        first = Row("options", "a")
        batcher.submit([first])  # the worker is idle, but a second request is on its way
        second = Row("options", "b")
        batcher.submit([second])
    for row in (first, second):
        row.future.result(WAIT)
    assert batcher.close(WAIT)
    assert sizes == [2]


def test_feature_cache_encodes_an_image_once(model):
    image = _png(20)
    with serving(model) as (url, _, _):
        first = _post(url, image, ["<CAPTION>", "<OD>"], **GREEDY)  # two tasks, one encoding
        second = _post(url, image, ["<CAPTION_TO_PHRASE_GROUNDING>"], text="a cat", **GREEDY)
        other = _post(url, _png(21), ["<CAPTION>"], **GREEDY)
        metrics = _metrics(url)
    assert [r.status_code for r in (first, second, other)] == [200] * 3
    assert metrics["flonnx_images_encoded_total"] == 2
    assert metrics['flonnx_feature_cache_total{result="hit"}'] == 1
    assert first.json()["timings"]["cached_images"] == 0 and second.json()["timings"]["cached_images"] == 1
    expected = model.run(image, "<CAPTION_TO_PHRASE_GROUNDING>", text="a cat", **GREEDY)
    assert second.json()["results"] == [[_json_equal(expected)]]


# -- backpressure, deadlines, limits --------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after(model):
    gate = Gate(model)
    with (
        serving(gate, queue_size=2, max_images=1, max_tasks=2) as (url, _, app),
        ThreadPoolExecutor(4) as pool,
    ):
        running = pool.submit(_post, url, _png(30), ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        queued = pool.submit(_post, url, _png(31), ["<CAPTION>", "<OD>"], **GREEDY)
        _wait_until(lambda: app.state.engine.batcher.depth == 2, "a full queue")
        refused = _post(url, _png(32), ["<CAPTION>"], **GREEDY)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["detail"]
        too_many_rows = _post(url, _png(33), ["<CAPTION>", "<OD>", "<OCR>"], **GREEDY)
        gate.release()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert _metrics(url)['flonnx_requests_total{status="503"}'] == 1
    assert too_many_rows.status_code == 413 and "at most 2" in too_many_rows.json()["detail"]


def test_deadline_answers_504_and_drops_the_queued_row(model):
    gate = Gate(model)
    with serving(gate, deadline_s=60) as (url, _, _), ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, url, _png(40), ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        late = _post(url, _png(41, (77, 55)), ["<OD>"], timeout_s=0.2, **GREEDY)
        assert late.status_code == 504 and "deadline" in late.json()["detail"]
        gate.release()
        assert running.result().status_code == 200
        assert _metrics(url)['flonnx_requests_total{status="504"}'] == 1
    assert len(gate.batches) == 1, "the row whose deadline passed in the queue must not run"


def test_limits_answer_413(model):
    with serving(model, max_upload_bytes=60_000, max_pixels=100 * 100, max_images=2) as (url, _, _):
        big = _png(50, (200, 150))  # random pixels: ~90 KB of PNG, 30,000 pixels
        assert len(big) > 60_000
        response = _post(url, big, ["<CAPTION>"], **GREEDY)
        assert response.status_code == 413 and "60,000" in response.json()["detail"]
        wide = Image.new("RGB", (300, 40), "white")  # compresses to little: the pixels are too many
        buffer = io.BytesIO()
        wide.save(buffer, format="PNG")
        response = _post(url, buffer.getvalue(), ["<CAPTION>"], **GREEDY)
        assert response.status_code == 413
        assert "300x40 = 12,000 pixels" in response.json()["detail"] and "10,000" in response.json()["detail"]
        body = {"images": [base64.b64encode(_png(i, (20, 20))).decode() for i in range(3)], "task": "<OD>"}
        response = httpx.post(f"{url}/v1/run", json=body, timeout=WAIT)
        assert response.status_code == 413 and "at most 2" in response.json()["detail"]
        capped = _post(url, _png(51), ["<OD>"], max_new_tokens=5000)
        assert capped.status_code == 422 and "at most 1024" in capped.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize(
    ("send", "status", "words"),
    [
        (lambda url: _post(url, b"not an image at all", ["<OD>"]), 400, ["image 0", "not an image"]),
        (lambda url: _post(url, _png(1), ["<FOO>"]), 422, ["'<FOO>'", "<OD>", "<CAPTION>"]),
        (lambda url: _post(url, _png(1), ["<OD>"], num_beams="many"), 422, ["num_beams", "'many'"]),
        (
            lambda url: _post(url, _png(1), ["<OD>"], text="a dog"),
            422,
            ["'a dog'", "<CAPTION_TO_PHRASE_GROUNDING>"],
        ),
        (
            lambda url: _post(url, _png(1), ["<REGION_TO_CATEGORY>"], region="1,2,3"),
            422,
            ["four numbers", "(1.0, 2.0, 3.0)"],
        ),
        (lambda url: _post(url, _png(1), ["<OD>"], top_p=2), 422, ["top_p"]),
        (lambda url: _post(url, _png(1), ["<OD>"], colour="red"), 422, ["colour"]),
        (
            lambda url: httpx.post(
                f"{url}/v1/run", content=b'{"image": ', headers={"content-type": "application/json"}
            ),
            400,
            ["not valid JSON"],
        ),
        (lambda url: httpx.post(f"{url}/v1/run", json={"image": "%%%", "task": "<OD>"}), 400, ["base64"]),
        (
            lambda url: httpx.post(f"{url}/v1/run", json={"image": "https://x.org/a.png", "task": "<OD>"}),
            400,
            ["URL"],
        ),
        (lambda url: httpx.post(f"{url}/v1/run", json={"task": "<OD>"}), 422, ["no image"]),
        (
            lambda url: httpx.post(f"{url}/v1/run", content=b"x", headers={"content-type": "text/plain"}),
            415,
            ["multipart/form-data", "'text/plain'"],
        ),
    ],
    ids=[
        "not-an-image",
        "unknown-task",
        "bad-option",
        "unused-text",
        "bad-region",
        "out-of-range",
        "unknown-field",
        "bad-json",
        "bad-base64",
        "url",
        "no-image",
        "content-type",
    ],
)
def test_bad_input_is_a_clear_4xx(shared_url, send, status, words):
    response = send(shared_url)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(word in detail for word in words), detail
    assert _post(shared_url, _png(2), ["<CAPTION>"], **GREEDY).status_code == 200  # and the server goes on


def test_health_and_metrics_answer_while_busy(model):
    gate = Gate(model)
    with serving(gate) as (url, _, _), ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, url, _png(60), ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=5)
        metrics = _metrics(url)
        assert time.monotonic() - started < 5
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert metrics["flonnx_requests_in_flight"] == 1
        assert metrics["process_resident_memory_bytes"] > 0
        gate.release()
        assert running.result().status_code == 200
        metrics = _metrics(url)
    assert metrics['flonnx_requests_total{status="200"}'] == 1
    assert metrics["flonnx_request_seconds_count"] == 1 and metrics["flonnx_generated_tokens_total"] > 0


def test_client_disconnect_frees_its_queued_row(model):
    gate = Gate(model)
    with serving(gate) as (url, _, app), ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, url, _png(70), ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            _post(url, _png(71), ["<OD>"], timeout=0.5, **GREEDY)
        _wait_until(lambda: _metrics(url).get('flonnx_requests_total{status="499"}') == 1, "a 499")
        assert app.state.engine.batcher.depth == 0
        gate.release()
        assert running.result().status_code == 200
    assert len(gate.batches) == 1


def test_graceful_shutdown_finishes_in_flight_requests(model):
    gate = Gate(model)
    with ThreadPoolExecutor(1) as pool, serving(gate) as (url, server, app):
        running = pool.submit(_post, url, _png(80), ["<CAPTION>"], **GREEDY)
        assert gate.entered.wait(WAIT)
        server.should_exit = True  # what SIGTERM does

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.ConnectError:
                return True
            return False

        _wait_until(refused, "the listening socket to close")
        gate.release()
        response = running.result(WAIT)
    assert response.status_code == 200
    assert response.json()["results"] == [[_json_equal(model.run(_png(80), "<CAPTION>", **GREEDY))]]
    assert not app.state.engine.healthy


def test_openapi_documents_both_encodings(shared_url):
    assert httpx.get(f"{shared_url}/docs").status_code == 200
    schema = httpx.get(f"{shared_url}/openapi.json").json()
    info = httpx.get(f"{shared_url}/v1/info").json()
    content = schema["paths"]["/v1/run"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert "RunBody" in schema["components"]["schemas"] and "TaskItem" in schema["components"]["schemas"]
    assert info["tasks"]["<OD>"] is None and info["tasks"]["<REGION_TO_CATEGORY>"] == "region"
    assert info["limits"]["max_batch"] == 8


def test_settings_are_validated():
    with pytest.raises(InputError, match="max_batch must be a positive integer, got 0"):
        ServeSettings(max_batch=0)
    with pytest.raises(InputError, match="deadline_s must be a number > 0"):
        ServeSettings(deadline_s=0)
    with pytest.raises(InputError, match="loopback|this machine"):
        LoadPlan(url="http://example.com:8000")


# -- the commands ----------------------------------------------------------------------------------


def test_serve_command_drains_on_sigterm(tiny_export_dir):
    """The CLI: prints its URL, answers, and on SIGTERM finishes the request in flight."""
    command = [sys.executable, "-m", "flonnx.runtime.cli", "serve", str(tiny_export_dir), "--port", "0"]
    process = subprocess.Popen([*command, "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "on http://127.0.0.1:" in line, line
        url = line.strip().rsplit(" ", 1)[-1]
        with ThreadPoolExecutor(1) as pool:
            # a long answer (forced length), so that it is still running when the signal comes
            long = pool.submit(_post, url, _png(90), ["<CAPTION>"], num_beams=1, min_new_tokens=300)
            _wait_until(lambda: _metrics(url).get("flonnx_requests_in_flight") == 1, "a request in flight")
            process.send_signal(signal.SIGTERM)
            response = long.result(WAIT)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0][0]["<CAPTION>"]) > 0
        # uvicorn re-raises the signal once it has shut down gracefully
        assert process.wait(WAIT) in (0, -signal.SIGTERM)
        log = process.stderr.read()
        assert "Waiting for connections to close" in log and "Application shutdown complete" in log, log
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_loadtest_command_with_faults(model, tmp_path, capsys):
    with serving(model, queue_size=8, max_batch=4, max_upload_bytes=500_000) as (url, _, _):
        out = tmp_path / "report.json"
        argv = [
            "loadtest",
            url,
            "-c",
            "4",
            "-n",
            "32",
            "--task",
            "<CAPTION>",
            "--max-new-tokens",
            str(TOKENS),
        ]
        argv += [
            "--num-beams",
            "1",
            "--faults",
            "disconnect,oversized,malformed,pixels",
            "--fault-every",
            "4",
        ]
        code = cli.main([*argv, "--flood", "--json", str(out)])
        report = json.loads(out.read_text())
    assert code == 0, capsys.readouterr()
    assert report["errors"] == 0 and report["answered"] == 24
    assert report["status"] == {"200": 24}
    assert {kind: sum(f["outcomes"].values()) for kind, f in report["faults"].items()} == {
        "disconnect": 2,
        "oversized": 2,
        "malformed": 2,
        "pixels": 2,
    }
    assert report["faults"]["oversized"]["outcomes"] == {"413": 2}
    assert report["faults"]["malformed"]["outcomes"] == {"400": 2}
    flood = report["flood"]
    assert flood["status"]["503"] > 0 and flood["503_with_retry_after"] == flood["status"]["503"]
    assert set(flood["status"]) <= {"200", "503"}
    assert report["server"]["mean_batch_size"] > 1  # concurrent requests really were batched
    assert report["server"]["rss_start_mb"] > 0 and report["latency_s"]["p99"] >= report["latency_s"]["p50"]
    assert "req/s" in capsys.readouterr().out


def test_runtime_does_not_import_serve():
    modules = "flonnx.runtime, flonnx.runtime.model, flonnx.runtime.cli, flonnx.runtime.run_cli"
    code = f"import sys, {modules}; print([m for m in sys.modules if m.startswith('flonnx.serve')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
