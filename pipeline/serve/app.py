"""The Ray Serve application: a tokenizing ingress in front of encoder replicas.

- :class:`Ingress` (FastAPI; no model, any number of replicas): the API key, the body size,
  the request checks, tokenizing, the queue limit, the request split into pieces of at most
  the batch token budget, the pieces sent to the encoders, the response in input order.
- :class:`Encoder` (one replica per GPU, or one on CPU): ``Embedder`` loaded once per replica,
  its weights checked against the driver's fingerprint, warmed up before it takes requests;
  pieces of all requests gathered into token-budgeted batches by its own queue (a batch is
  taken when the encoder is free: everything waiting, up to the budget; ``@serve.batch`` with
  a token-counting ``batch_size_fn`` is the measured alternative) and embedded with
  ``Embedder.embed_tokenized``, the batch job's own path (packing, pooling, the Matryoshka cut
  and re-normalisation).

``app_builder`` is the entry for ``serve run pipeline.serve.app:app_builder model=... dims=...``
and a RayService's ``import_path``; ``python -m pipeline serve`` calls :func:`build_app`.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request)
# at runtime, and Serve rebinds the methods where string annotations do not resolve.

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import time
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from ..batching import default_max_tokens
from ..config import resolve_device_type, resolve_dtype_name
from ..model.cpu import CPU_WORKER_ENV, default_threads, set_threads
from .admission import Admission, QueueFull
from .config import API_KEY_ENV, ServeConfig, config_from_strings
from .identity import ServedModel, check_expected_output, dtype_warning, load_served_model
from .inputs import (Piece, QueryTokenizer, join_pieces, piece_tokens, split_pieces,
                     take_batch)
from .metrics import EncoderMetrics, IngressMetrics
from .protocol import (FINGERPRINT_HEADER, ApiError, embedding_response, http_error,
                       parse_json, parse_request)

log = logging.getLogger("ray.serve")  # Serve's logger: replica log files, with request ids

APP_NAME = "embeddings"
# Pieces an encoder replica holds at once (queued for a batch or running): enough for every
# ingress's queue limit; the ingress refuses (429) long before this.
ENCODER_MAX_ONGOING = 4096
INGRESS_MAX_ONGOING = 1024
READY_TIMEOUT_S = 5.0
# How often a stopping replica checks that its requests are done (Serve's default, 2 s, is
# long next to a request's milliseconds, and doubles the time a stop takes).
DRAIN_CHECK_S = 0.25
# Requests with this many texts or more are tokenized and rendered off the event loop.
OFF_LOOP_INPUTS = 64
# @serve.batch's size before reconfigure() sets the deployment's own (it must be set here).
_INITIAL_BATCH_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class Limits:
    """The ingress's limits: its ``user_config`` (a Serve config may change them in place)."""

    max_inputs: int
    max_body_bytes: int
    max_queued_tokens: int
    truncate: bool

    @classmethod
    def of(cls, config: ServeConfig) -> "Limits":
        return cls(config.max_inputs, config.max_body_bytes, config.max_queued_tokens,
                   config.truncate)


api = FastAPI(title="nomic-moe-pipeline embeddings", docs_url=None, redoc_url=None,
              openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return await _api_error(request, http_error(err.status_code, f"{request.method} "
                                                f"{request.url.path}: {err.detail}"))


# Defined before the ingress class: ``serve.ingress`` freezes the FastAPI app (and the route
# functions' globals) by pickling it when the class is decorated.
def request_log_line(status: int, seconds: float, facts: dict[str, Any]) -> str:
    """One line per request: what was asked and how it went, never the texts."""
    shown = " ".join(f"{k}={facts[k]}" for k in ("inputs", "tokens", "width", "task",
                                                   "encoding", "user")
                     if facts.get(k) is not None)
    return f"embeddings status={status} ms={seconds * 1000:.1f} {shown}".rstrip()


async def _off_loop(inputs: int, fn, *args):
    """``fn(*args)`` on a thread when the request is large (tokenizing or rendering 2,048 texts
    takes tens of milliseconds, which would stall every other request of the replica)."""
    if inputs < OFF_LOOP_INPUTS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _render(vectors, encoding: str, model_id: str, tokens: int) -> bytes:
    return json.dumps(embedding_response(vectors, encoding, model_id, tokens),
                      separators=(",", ":")).encode()


def _queue_full(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def _too_large(size: int, limit: int, *, declared: bool) -> ApiError:
    # A streamed body is refused once it passes the limit: its whole size is not known.
    size_is = f"has {size} bytes" if declared else f"is over {limit} bytes"
    return ApiError(413, f"the request body {size_is}, more than this service takes "
                    f"({limit}, --max-body-bytes); split the input", code="request_too_large")


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)
@serve.ingress(api)
class Ingress:
    """The HTTP API (see the module docstring)."""

    def __init__(self, served: ServedModel, encoder, api_key: str | None, batch_tokens: int,
                 expected_output: str | None = None) -> None:
        self.served, self.encoder, self.batch_tokens = served, encoder, batch_tokens
        self._key = api_key.encode() if api_key else None
        self.expected_output = expected_output
        self.tokenizer = QueryTokenizer(served.tokenizer_json)
        self.admission = Admission(1)
        self.limits: Limits | None = None
        self.metrics = IngressMetrics()

    def reconfigure(self, limits: dict[str, Any]) -> None:
        self.limits = Limits(**limits)
        self.admission.max_tokens = self.limits.max_queued_tokens
        self.tokenizer.truncate = self.limits.truncate

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        started, facts, status = time.perf_counter(), {}, 500
        try:
            response = await self._embeddings(request, facts)
            status = 200
            return response
        except ApiError as err:
            status = err.status
            raise
        except Exception as err:  # noqa: BLE001 - any failure is a 500 in the envelope
            log.exception("embeddings request failed")
            raise ApiError(500, f"the service failed: {type(err).__name__}: {err}",
                           type="server_error") from err
        finally:
            seconds = time.perf_counter() - started
            self.metrics.answered(status, "/v1/embeddings", seconds)
            log.info(request_log_line(status, seconds, facts))

    async def _embeddings(self, request: Request, facts: dict[str, Any]) -> Response:
        self._check_key(request)
        body = parse_json(await self._read_body(request))
        req = parse_request(body, self.served.widths, self.limits.max_inputs)
        facts |= {"inputs": len(req.texts), "width": req.width, "task": req.task,
                  "encoding": req.encoding, "user": req.user}
        if not self.served.accepts(req.model):
            raise ApiError(404, f"model {req.model!r} is not served here; this service serves "
                           f"{self.served.id} (GET /v1/models)", param="model",
                           code="model_not_found")
        batch = await _off_loop(len(req.texts), self.tokenizer.tokenize, req.texts, req.task)
        tokens = facts["tokens"] = int(batch.lengths.sum())
        vectors = await self._encode(split_pieces(batch, req.width, self.batch_tokens), tokens)
        self.metrics.embedded(len(req.texts), tokens)
        body = await _off_loop(len(req.texts), _render, vectors, req.encoding, self.served.id,
                               tokens)
        return Response(body, media_type="application/json",
                        headers={FINGERPRINT_HEADER: self.served.fingerprint})

    async def _encode(self, pieces: list[Piece], tokens: int) -> np.ndarray:
        """The pieces' vectors, in order, within the queue limit."""
        try:
            self.admission.admit(tokens)
        except QueueFull as full:
            raise _queue_full(str(full), full.retry_after) from None
        self.metrics.queued.set(self.admission.queued)
        answered = False
        try:
            parts = await asyncio.gather(*(self.encoder.encode.remote(p) for p in pieces))
            answered = True
        except BackPressureError as err:
            raise _queue_full(f"the encoders' queue is full: {err}",
                              self.admission.retry_after()) from None
        finally:
            self.admission.release(tokens, answered)
            self.metrics.queued.set(self.admission.queued)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _check_key(self, request: Request) -> None:
        if self._key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self._key):
            raise ApiError(401, "missing or incorrect API key: send `Authorization: Bearer "
                           "<key>`", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit, declared=True)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit, declared=False)
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        return await self._counted("/v1/models", self._models(request))

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> JSONResponse:
        return await self._counted("/v1/models/{model}", self._model(model, request))

    async def _models(self, request: Request) -> JSONResponse:
        self._check_key(request)
        return JSONResponse({"object": "list", "data": [await self._card()]},
                            headers={FINGERPRINT_HEADER: self.served.fingerprint})

    async def _model(self, model: str, request: Request) -> JSONResponse:
        self._check_key(request)
        if not self.served.accepts(model):
            raise ApiError(404, f"model {model!r} is not served here; this service serves "
                           f"{self.served.id}", param="model", code="model_not_found")
        return JSONResponse(await self._card(),
                            headers={FINGERPRINT_HEADER: self.served.fingerprint})

    async def _counted(self, route: str, answer) -> JSONResponse:
        """``answer`` awaited, and counted in the requests metric with its status (a
        refusal too)."""
        status = 500
        try:
            response = await answer
            status = response.status_code
            return response
        except ApiError as err:
            status = err.status
            raise
        finally:
            self.metrics.answered(status, route, 0.0)

    async def _card(self) -> dict[str, Any]:
        info = await self._encoder_info()
        return self.served.card(info.get("dtype") if info else None)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 once an encoder replica answers with the driver's weights fingerprint (a replica
        takes requests only after loading, checking and warming up); else 503."""
        info = await self._encoder_info()
        ready = bool(info) and info["fingerprint"] == self.served.fingerprint
        body = {"ready": ready, "model": self.served.id,
                "weights_fingerprint": self.served.fingerprint,
                "expected_output": self.expected_output} | (info or {})
        if not info:
            body["reason"] = f"no encoder replica answered within {READY_TIMEOUT_S:g} s"
        elif not ready:
            body["reason"] = "an encoder replica loaded other weights"
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _encoder_info(self) -> dict[str, Any] | None:
        async def call():
            return await self.encoder.info.remote()

        try:
            return await asyncio.wait_for(call(), READY_TIMEOUT_S)
        except (asyncio.TimeoutError, BackPressureError):
            return None


# No access log line per piece: the ingress logs each request.
@serve.deployment(max_ongoing_requests=ENCODER_MAX_ONGOING,
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
                  logging_config={"enable_access_log": False})
class Encoder:
    """One loaded encoder; embeds pieces in token-budgeted batches (see the module docstring)."""

    def __init__(self, load: dict[str, Any], threads: int | None,
                 expected: dict[str, Any] | None = None) -> None:
        if load["device"] == "cpu":
            set_threads(threads or default_threads(1))
        # Lazy: the embedder imports torch, after the thread count is set.
        from ..embedder import load_worker_embedder

        self.embedder = load_worker_embedder(**load)
        self.fingerprint, self.device = load["fingerprint"], load["device"]
        self.dtype = str(self.embedder.encoder.dtype).removeprefix("torch.")
        self.warnings = [w for w in [dtype_warning(expected, self.dtype) if expected else None]
                         if w]
        for warning in self.warnings:
            log.warning(warning)
        # One thread runs every forward pass: the event loop stays free to gather the next
        # batch, and torch always sees the same thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.embedder.encode(["warm-up"], task="query", dims=(self.embedder.hidden_size,))
        # Set by reconfigure() (the deployment's user_config) before the first request.
        self.batching, self.max_batch_tokens, self.batch_wait_s = "queue", 0, 0.0
        self._waiting: collections.deque = collections.deque()  # (piece, future), oldest first
        self._arrived = asyncio.Event()
        self._batcher: asyncio.Task | None = None
        self._alone = asyncio.Lock()
        self.metrics = EncoderMetrics()
        self.totals = {"batches": 0, "pieces": 0, "tokens": 0, "encode_s": 0.0}

    def reconfigure(self, options: dict[str, Any]) -> None:
        self.batching = options["batching"]
        self.max_batch_tokens = options["max_batch_tokens"]
        self.batch_wait_s = options["batch_wait_ms"] / 1000
        self._batched.set_max_batch_size(self.max_batch_tokens)
        self._batched.set_batch_wait_timeout_s(self.batch_wait_s)

    async def encode(self, piece: Piece) -> np.ndarray:
        """The piece's vectors ``[N, piece.width]`` float32, batched with other requests'."""
        if self.batching == "queue":
            return await self._queued(piece)
        if self.batching == "serve-batch":
            return await self._batched(piece)
        async with self._alone:
            (vectors,) = await self._run([piece])
            return vectors

    async def _queued(self, piece: Piece) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((piece, future))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._take_batches())
        self._arrived.set()
        return await future

    async def _take_batches(self) -> None:
        """Our own queue: a batch is taken only when the encoder is free, so everything that
        arrived while it was busy goes in the next batch (up to the token budget). Ray Serve's
        ``@serve.batch`` closes a batch ``batch_wait_ms`` after its first request even while
        the encoder is busy, and the closed batches queue behind it: at 64 clients they held
        ~2 requests each (measured, BENCHMARKS.md)."""
        while True:
            await self._arrived.wait()
            if self.batch_wait_s:  # the encoder was idle: let a batch fill for a moment
                await asyncio.sleep(self.batch_wait_s)
            while self._waiting:
                taken = take_batch(self._waiting, self.max_batch_tokens)
                self.metrics.queue.set(len(self._waiting))
                if taken:
                    await self._answer(taken)
            self._arrived.clear()

    async def _answer(self, taken: list) -> None:
        """Embed a batch taken from the queue and hand each caller its vectors (or the error)."""
        try:
            results = await self._run([piece for piece, _ in taken])
        except Exception as err:  # noqa: BLE001 - each caller gets the batch's error
            for _, future in taken:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), vectors in zip(taken, results):
            if not future.done():
                future.set_result(vectors)

    @serve.batch(max_batch_size=_INITIAL_BATCH_TOKENS, batch_size_fn=piece_tokens)
    async def _batched(self, pieces: list[Piece]) -> list[np.ndarray]:
        return await self._run(pieces)

    async def _run(self, pieces: list[Piece]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._embed, pieces)

    def _embed(self, pieces: list[Piece]) -> list[np.ndarray]:
        started = time.perf_counter()
        batch, rows = join_pieces(pieces)
        widths = sorted({p.width for p in pieces}, reverse=True)
        out = self.embedder.embed_tokenized(batch, widths)
        tokens, seconds = int(batch.lengths.sum()), time.perf_counter() - started
        self.metrics.batch(tokens, len(pieces), seconds)
        for key, value in (("batches", 1), ("pieces", len(pieces)), ("tokens", tokens),
                           ("encode_s", seconds)):
            self.totals[key] += value
        return [out[p.width][a:b] for p, (a, b) in zip(pieces, rows)]

    def info(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "device": self.device, "dtype": self.dtype,
                "warnings": self.warnings}

    def stats(self) -> dict[str, Any]:
        """This replica's batches, request pieces, tokens and encoder seconds since it started
        (the benchmark's view into batching; the metrics carry the same per batch)."""
        return dict(self.totals)


def build_app(config: ServeConfig, served: ServedModel, gpus: float,
              api_key: str | None = None, expected: dict[str, Any] | None = None,
              expected_output: str | None = None):
    """The application: ingress and encoders, sized for a cluster with ``gpus`` GPUs."""
    # An explicit cuda is taken as it is: the GPU nodes of an autoscaled group may not be up
    # yet when the application is built; its replicas wait for them.
    device = config.device if config.device != "auto" else resolve_device_type("auto", gpus)
    batch_tokens = config.max_batch_tokens or default_max_tokens(
        device, resolve_dtype_name(config.dtype, device))
    replicas = config.replicas or (max(1, int(gpus)) if device == "cuda" else 1)
    threads = None
    if device == "cuda":
        actor = {"num_gpus": 1, "num_cpus": 1}
    else:
        threads = config.encoder_threads or default_threads(replicas)
        actor = {"num_cpus": 1, "runtime_env": {"env_vars": CPU_WORKER_ENV | {
            "OMP_NUM_THREADS": str(threads)}}}
    load = dict(model=served.source, revision=served.revision, device=device,
                dtype=config.dtype, max_tokens_per_batch=None,
                storage_options=config.storage_options, fingerprint=served.fingerprint,
                gguf_expert_bias=config.gguf_expert_bias)
    encoder = Encoder.options(
        num_replicas=replicas, ray_actor_options=actor,
        user_config={"batching": config.batching, "max_batch_tokens": batch_tokens,
                     "batch_wait_ms": config.batch_wait_ms},
    ).bind(load, threads, expected)
    return Ingress.options(
        num_replicas=config.ingress_replicas, user_config=dataclasses.asdict(Limits.of(config)),
    ).bind(served, encoder, api_key, batch_tokens, expected_output)


def prepare(config: ServeConfig) -> tuple[ServedModel, dict[str, Any] | None, str | None]:
    """The model resolved and fingerprinted, and ``--expect-output`` checked (before Ray):
    ``(served, the batch output's identity, the output matched)``; raises on a mismatch. The
    output matched is the snapshot a nightly root or its ``_LATEST`` named at start."""
    served = load_served_model(config)
    if not config.expect_output:
        return served, None, None
    identity = check_expected_output(config.expect_output, served, config.storage_options)
    return served, identity, identity["output"]


def app_builder(args: dict[str, str]):
    """``serve run pipeline.serve.app:app_builder model=... dims=768,512,256`` and a
    RayService's ``import_path``: the options of ``python -m pipeline serve`` as ``key=value``
    (``host`` and ``port`` are Serve's HTTP options there, and the cluster is the one Serve
    runs on: those three are refused). The API key comes from ``$NOMIC_PIPELINE_API_KEY``
    unless ``api_key`` is given."""
    ignored = sorted({"host", "port", "address"} & set(args))
    if ignored:
        # `serve run` has no --host/--port (Ray 2.60): an import path listens on
        # 127.0.0.1:8000, and a config file's http_options choose.
        raise ValueError(f"{ignored} are not application arguments: set host and port in the "
                         "http_options of a Serve config file (serve run config.yaml, serve "
                         "deploy, a RayService's serveConfigV2); the cluster is the one Serve "
                         "runs on")
    config = config_from_strings(args)
    served, expected, where = prepare(config)
    return build_app(config, served, cluster_gpus(), config.api_key or os.environ.get(
        API_KEY_ENV), expected, where)


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster; of this machine when Ray is not connected yet
    (``serve run`` builds the application before it connects)."""
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0.0)
    # Lazy: torch only to count this machine's GPUs.
    import torch

    return float(torch.cuda.device_count())
