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
import socket
import threading
from typing import Any, Iterator

import ray
from ray import serve

from ..errors import RunFailed, UserError
from .app import APP_NAME, build_app, prepare
from .config import ServeConfig
from .identity import ServedModel


@dataclasses.dataclass(frozen=True)
class Service:
    """A running service: where it listens and what it serves."""

    url: str  # http://host:port
    served: ServedModel
    expected: dict[str, Any] | None  # the --expect-output run's identity, when given
    metrics_url: str | None = None  # this node's Prometheus endpoint (Ray's metrics export)
    logs_dir: str | None = None  # this node's Ray logs; Serve's (request logs) in serve/

    def encoder_stats(self) -> dict[str, Any]:
        """One encoder replica's totals (batches, pieces, tokens, encoder seconds)."""
        return serve.get_deployment_handle("Encoder", APP_NAME).stats.remote().result()

    def describe(self) -> list[str]:
        lines = [f"serving {self.served.id} at {self.url}/v1/embeddings (widths "
                 f"{','.join(map(str, self.served.widths))})",
                 f"weights {self.served.fingerprint}"]
        if self.expected is not None:
            lines.append(f"matches the weights, tokenizer and widths of the batch output "
                         f"{self.expected['output']}")
        if self.metrics_url:
            lines.append(f"metrics {self.metrics_url}")
        if self.logs_dir:
            lines.append(f"request logs in {self.logs_dir}/serve/")
        return lines


def init_ray(config: ServeConfig) -> tuple[bool, dict[str, Any]]:
    """Connect to ``--address`` or ``$RAY_ADDRESS``, else start a local Ray: whether this call
    started or connected it, and this node's addresses (``ray.init``'s ``address_info``;
    empty through Ray Client, ``ray://``)."""
    if ray.is_initialized():
        return False, _address_info(ray.init(ignore_reinit_error=True))
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        return True, _address_info(ray.init(address=address, logging_level=logging.WARNING))
    # Lazy: torch only to count this machine's GPUs for the local Ray.
    import torch

    # address="local": a Ray of the service's own, even where a `ray start` cluster runs here.
    # Its dashboard is off, so Ray writes no Prometheus service-discovery file for it: the
    # command prints the metrics endpoint instead.
    context = ray.init(address="local", num_cpus=os.cpu_count() or 1,
                       num_gpus=torch.cuda.device_count(), include_dashboard=False,
                       logging_level=logging.WARNING)
    return True, _address_info(context)


def _address_info(context) -> dict[str, Any]:
    return dict(getattr(context, "address_info", None) or {})


def check_listen(host: str, port: int) -> None:
    """Raise :class:`UserError` unless ``host:port`` can be listened on here (Serve's proxy
    would fail later, after Ray started, with a traceback). Bound as the proxy binds it: with
    ``SO_REUSEADDR``, so that the connections a stopped service left in TIME-WAIT (a minute
    on Linux) do not refuse its restart, while a port some socket listens on still does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror} (another "
                            "service there? choose --port or --host)") from None


def _service(config: ServeConfig, served: ServedModel, expected: dict[str, Any] | None,
             node: dict[str, Any]) -> Service:
    port, session = node.get("metrics_export_port"), node.get("session_dir")
    return Service(f"http://{config.host}:{config.port}", served, expected,
                   f"http://{node.get('node_ip_address')}:{port}/metrics" if port else None,
                   f"{session}/logs" if session else None)


@contextlib.contextmanager
def running(config: ServeConfig, api_key: str | None = None) -> Iterator[Service]:
    """The service, deployed and ready, for the length of the ``with`` block. On exit the
    application is deleted first (its replicas answer the requests in flight while Serve's
    proxy still runs; ``serve.shutdown`` alone kills the proxy at once, cutting them off),
    then Serve is shut down, and a Ray this call started with it."""
    served, expected, where = prepare(config)
    if not (ray.is_initialized() or config.address or os.environ.get("RAY_ADDRESS")):
        check_listen(config.host, config.port)  # a local Ray: its proxy listens here
    started, node = init_ray(config)
    try:
        app = build_app(config, served, ray.cluster_resources().get("GPU", 0.0), api_key,
                        expected, where)
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # the proxy or a replica failed: Serve's message says why
            raise RunFailed(f"the service did not start: {err}") from err
        yield _service(config, served, expected, node)
    finally:
        _stop(started)


def _stop(started: bool) -> None:
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)  # the replicas drain behind a live proxy
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
