"""``python -m pipeline serve``: the model checked, Ray and Serve started, the application
deployed and ready, then served until SIGINT/SIGTERM.

The model is resolved and fingerprinted, and ``--expect-output`` checked, before Ray starts,
so a wrong model or a mismatched output costs seconds. ``serve.run`` returns once every
replica has loaded its model, checked its weights and warmed up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Iterator

import ray
from ray import serve

from ..errors import RunFailed
from .app import APP_NAME, build_app, prepare
from .config import ServeConfig
from .identity import ServedModel


@dataclasses.dataclass(frozen=True)
class Service:
    """A running service: where it listens and what it serves."""

    url: str  # http://host:port
    served: ServedModel
    expected: dict[str, Any] | None  # the --expect-output run's identity, when given

    def encoder_stats(self) -> dict[str, Any]:
        """One encoder replica's totals (batches, pieces, tokens, encoder seconds)."""
        return serve.get_deployment_handle("Encoder", APP_NAME).stats.remote().result()

    def describe(self) -> list[str]:
        lines = [f"serving {self.served.id} at {self.url}/v1/embeddings (widths "
                 f"{','.join(map(str, self.served.widths))})",
                 f"weights {self.served.fingerprint}"]
        if self.expected is not None:
            lines.append("matches the batch output's weights, tokenizer and widths")
        return lines


def init_ray(config: ServeConfig) -> bool:
    """Connect to ``--address`` or ``$RAY_ADDRESS``, else start a local Ray; True if started."""
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    # Lazy: torch only to count this machine's GPUs for the local Ray.
    import torch

    # address="local": a Ray of the service's own, even where a `ray start` cluster runs here.
    ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(),
             include_dashboard=False, logging_level=logging.WARNING)
    return True


@contextlib.contextmanager
def running(config: ServeConfig, api_key: str | None = None) -> Iterator[Service]:
    """The service, deployed and ready, for the length of the ``with`` block; Serve is shut
    down on exit, and a Ray this call started with it."""
    served, expected, where = prepare(config)
    started = init_ray(config)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        app = build_app(config, served, ray.cluster_resources().get("GPU", 0.0), api_key,
                        expected, where)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # a replica failed to start: Serve's message says why
            raise RunFailed(f"the service did not start: {err}") from err
        yield Service(f"http://{config.host}:{config.port}", served, expected)
    finally:
        if ray.is_initialized():
            serve.shutdown()
        if started:
            ray.shutdown()


def serve_until_stopped(config: ServeConfig, api_key: str | None = None) -> None:
    """Run the service until SIGINT or SIGTERM (what ``python -m pipeline serve`` does)."""
    stop = threading.Event()
    with running(config, api_key) as service:
        # After ray.init, which sets its own SIGTERM handler (an exit without Serve's drain).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("\n".join(service.describe()), flush=True)
        stop.wait()
        print("stopping: answering the requests in flight, then shutting down", flush=True)
