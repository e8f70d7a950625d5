"""The serving core as a Ray Serve application, on a small local Ray instance: a handful of
requests over HTTP answer as Florence2.run and as `flonnx serve` does."""

from __future__ import annotations

import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray", reason="Ray Serve needs the 'ray' extra (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve needs the 'ray' extra (pip install '.[ray]')")

from flonnx.runtime.errors import InputError  # noqa: E402
from flonnx.runtime.model import Florence2  # noqa: E402
from flonnx.serve import ray_app  # noqa: E402
from flonnx.serve.settings import ServeSettings  # noqa: E402

GREEDY = {"max_new_tokens": 12, "num_beams": 1}


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_export_dir):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(batch_window_ms=20)
        serve.run(ray_app.application(tiny_export_dir, settings, threads=1), name="flonnx", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, image: bytes, tasks, **fields) -> httpx.Response:
    data = {"task": list(tasks), **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{url}/v1/run", data=data, files={"image": ("i.png", image, "image/png")}, timeout=60)


def test_ray_serve_answers_as_florence2_run(ray_url, tiny_export_dir):
    model = Florence2.load(tiny_export_dir, threads=1)
    images = [_png(i) for i in range(4)]
    tasks = ["<CAPTION>", "<OD>", "<CAPTION>", "<OD>"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(lambda pair: _post(ray_url, pair[0], [pair[1]], **GREEDY), zip(images, tasks))
        )
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    for image, task, response in zip(images, tasks, responses):
        expected = json.loads(json.dumps(model.run(image, task, **GREEDY)))
        assert response.json()["results"] == [[expected]]
    bad = _post(ray_url, images[0], ["<FOO>"])
    assert bad.status_code == 422 and "<OD>" in bad.json()["detail"]
    assert httpx.get(f"{ray_url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{ray_url}/metrics").text
    assert 'flonnx_requests_total{status="200"} 4.0' in metrics


def test_serve_run_builder_arguments():
    with pytest.raises(InputError, match="needs folder="):
        ray_app.app({})
    with pytest.raises(InputError, match="unknown argument colour"):
        ray_app.app({"folder": "x", "colour": "red"})
