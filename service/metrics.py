"""Prometheus metrics, built on an injected registry (never the global one), without session ids as labels."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STREAM_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """Every metric the service exports. Transports record requests; the core records the rest."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lstm_requests", "Requests by protocol, method and result code", ["protocol", "method", "code"], registry=r
        )
        self.request_latency = Histogram(
            "lstm_request_latency_seconds", "Latency of unary requests (not streams) by protocol and method",
            ["protocol", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stream_duration = Histogram(
            "lstm_stream_duration_seconds", "How long streams stay open, by protocol", ["protocol"],
            buckets=STREAM_BUCKETS, registry=r,
        )  # fmt: skip
        self.stream_messages = Counter(
            "lstm_stream_messages", "Messages received on streams, by protocol and result code",
            ["protocol", "code"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "lstm_queue_wait_seconds", "Time a step call waits in the queue until its batch starts", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "lstm_inference_seconds",
            "ONNX Runtime run time per batch (without waiting for a thread)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # NOTE: multiprocess_mode says how --workers processes add up (used only in Prometheus multiprocess mode)
        self.queue_depth = Gauge(
            "lstm_queue_depth", "Step calls queued or running, per model version", ["model"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.batch_size = Histogram(
            "lstm_batch_size", "Step calls per ONNX Runtime batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.steps = Counter("lstm_steps", "Time steps computed (sessions and predictions)", ["model"], registry=r)
        # NOTE: counted in the store, which --workers share: every process reports the same number
        self.sessions_open = Gauge(
            "lstm_sessions_open", "Open sessions", ["model"], registry=r, multiprocess_mode="livemax"
        )
        self.sessions_created = Counter("lstm_sessions_created", "Sessions created", ["model"], registry=r)
        self.sessions_removed = Counter(
            "lstm_sessions_removed", "Sessions removed, by reason (deleted, expired, evicted)", ["model", "reason"],
            registry=r,
        )  # fmt: skip
        # NOTE: live accuracy (service/core/scoring.py): MAE = error / scored, skill = 1 - error / persistence error
        self.forecast_error = Counter(
            "lstm_forecast_abs_error", "Absolute errors of the model's forecasts, summed as the truth arrived, by "
            "horizon step", ["model", "version", "horizon"], registry=r,
        )  # fmt: skip
        self.persistence_error = Counter(
            "lstm_forecast_persistence_abs_error", "Absolute errors of the persistence forecast (the last value seen) "
            "at the same origins, by horizon step", ["model", "version", "horizon"], registry=r,
        )  # fmt: skip
        self.forecasts_scored = Counter(
            "lstm_forecasts_scored", "Forecasts scored as the truth arrived, by horizon step",
            ["model", "version", "horizon"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "lstm_model_info", "Loaded models (value 1)", ["model", "version", "features", "horizon"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.ready = Gauge(
            "lstm_ready", "1 when the server accepts new work, 0 while starting or draining", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip


def exposition(registry: CollectorRegistry) -> bytes:
    """The /metrics text: this process's registry, or in Prometheus multiprocess mode (--workers) the sum over
    every worker process."""
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
    return generate_latest(registry)
