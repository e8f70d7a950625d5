"""Prometheus metrics of one server, in a registry of its own (so a process can hold several apps)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Seconds: from a cached caption on the tiny model (ms) to a queued base request (a minute or two).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)
# Status 499 (nginx's "client closed request"): the client went away before its answer.
CLIENT_CLOSED = 499


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes and friends: what `flonnx loadtest` reads the RSS from
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("flonnx_requests", "HTTP /v1/run requests by status", ["status"], registry=r)
        self.request_seconds = Histogram(
            "flonnx_request_seconds", "/v1/run, arrival to answer", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "flonnx_queue_seconds",
            "rows, arrival to the start of their batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "flonnx_batch_seconds",
            "one run_batch, vision encoder included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, max_batch})
        self.batch_size = Histogram(
            "flonnx_batch_size", "rows (image x task) per run_batch", buckets=sizes, registry=r
        )
        self.queue_depth = Gauge("flonnx_queue_depth", "rows waiting for a batch", registry=r)
        self.in_flight = Gauge("flonnx_requests_in_flight", "/v1/run requests being answered", registry=r)
        self.tokens = Counter("flonnx_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "flonnx_tokens_per_second", "tokens per second of decoding in the last batch", registry=r
        )
        self.images_encoded = Counter(
            "flonnx_images_encoded", "images through the vision encoder", registry=r
        )
        self.cache = Counter("flonnx_feature_cache", "image-feature cache lookups", ["result"], registry=r)
        self.cache_bytes = Gauge("flonnx_feature_cache_bytes", "bytes held by the feature cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
