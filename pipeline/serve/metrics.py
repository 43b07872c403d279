"""The service's Prometheus metrics, through Ray's metrics (``ray.util.metrics``): each node's
metrics agent exports them with Ray's own (names prefixed ``ray_``), so the scrape set up for
a Ray cluster (KubeRay's PodMonitor, or Ray's service-discovery file on a local Ray) gets them.

Made once per replica, in its process (a Ray metric records only where Ray runs).
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
TOKEN_BOUNDARIES = [16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


class IngressMetrics:
    """Requests by status, inputs, tokens, the tokens waiting, request latency."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "embeddings_requests", "requests answered, by HTTP status and route",
            tag_keys=("status", "route"))
        self.inputs = metrics.Counter("embeddings_inputs", "texts embedded")
        self.tokens = metrics.Counter("embeddings_tokens", "tokens embedded (prefix and "
                                      "<s>/</s> included)")
        self.queued = metrics.Gauge("embeddings_queued_tokens", "tokens accepted and not yet "
                                    "answered by this ingress replica")
        self.latency = metrics.Histogram("embeddings_latency_s", "request latency, seconds",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("status",))

    def answered(self, status: int, route: str, seconds: float) -> None:
        self.requests.inc(tags={"status": str(status), "route": route})
        if route == "/v1/embeddings":
            self.latency.observe(seconds, tags={"status": str(status)})

    def embedded(self, inputs: int, tokens: int) -> None:
        self.inputs.inc(inputs)
        self.tokens.inc(tokens)


class EncoderMetrics:
    """Tokens and pieces per encoder batch, the encoder's time per batch, its queue."""

    def __init__(self) -> None:
        self.queue = metrics.Gauge("embeddings_encoder_queue", "request pieces waiting in this "
                                   "encoder replica's queue")
        self.batch_tokens = metrics.Histogram("embeddings_batch_tokens", "tokens per encoder "
                                              "batch", boundaries=TOKEN_BOUNDARIES)
        self.batch_pieces = metrics.Histogram("embeddings_batch_requests", "request pieces "
                                              "per encoder batch",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.batch_seconds = metrics.Histogram("embeddings_batch_s", "encoder time per batch, "
                                               "seconds", boundaries=LATENCY_BOUNDARIES_S)

    def batch(self, tokens: int, pieces: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_pieces.observe(pieces)
        self.batch_seconds.observe(seconds)
