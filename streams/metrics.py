"""Every Prometheus metric of the workers, declared in one place.

Workers expose them on ``PINFRESH_WORKER__METRICS_PORT`` (off by default).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS = Counter("pinfresh_events_total", "Events consumed, by outcome", ["outcome"])
IMAGES_ENCODED = Counter("pinfresh_images_encoded_total", "Images run through the encoder")
DEAD_LETTERS = Counter("pinfresh_dead_letters_total", "Dead letters written, by reason", ["reason"])
DEAD_LETTERS_DROPPED = Counter(
    "pinfresh_dead_letters_dropped_total",
    "Dead letters the broker refused even without their original (logged instead)",
)
ISOLATED = Counter(
    "pinfresh_batches_isolated_total",
    "Batches split to isolate an event that raised an unexpected error",
)
RETRIES = Counter("pinfresh_retries_total", "Retries after transient errors", ["stage"])
BATCH_SIZE = Histogram(
    "pinfresh_batch_size", "Events per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STAGE_SECONDS = Histogram(
    "pinfresh_stage_seconds", "Time per batch in each stage", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FRESHNESS = Histogram(
    "pinfresh_freshness_seconds", "Event time to vector readable in Redis",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
ENCODER_BATCH = Histogram(
    "pinfresh_encoder_batch_size", "Images per batch dispatched to the encoder pipeline",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ENCODER_BATCH_WAIT = Histogram(
    "pinfresh_encoder_batch_wait_seconds", "First image in a batch to the batch's dispatch",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
MODEL_INFO = Gauge("pinfresh_worker_model_info", "Model version the worker writes", ["version"])
CONSUMER_LAG = Gauge(
    "pinfresh_consumer_lag", "Events not yet committed, per partition this worker holds",
    ["partition"])
PARTITION_STALLED = Gauge(
    "pinfresh_partition_stalled_seconds",
    "Seconds a held partition's committed offset has not moved while it has lag (0: no lag)",
    ["partition"])


def serve_metrics(host: str, port: int) -> None:
    """Start the Prometheus HTTP endpoint in a background thread (port 0 = off)."""
    if port:
        start_http_server(port, addr=host)
