"""``python -m pipeline.bench serve``: the query service against the encoder alone.

Query-length texts (one per request; log-normal lengths, median ~14 tokens, 6 to 48), the
same model, device and dtype throughout. Reports:

* ``ceiling``: ``Embedder.encode`` in this process on the same texts: all at once (texts/s,
  the most the encoder can give; the best of 3) and one at a time (the latency of a lone
  request's encode);
* ``service``: ``python -m pipeline serve`` on a local Ray, driven over HTTP by 1, 8 and 64
  concurrent clients (closed loop: each client sends its next request when the last one is
  answered): requests/s and p50/p99 latency, for each ``--batching``: ``queue`` (the
  encoder's own queue, the default), ``serve-batch`` (Ray Serve's ``@serve.batch`` by tokens)
  and ``off`` (each request encoded alone); and from the encoder replica, requests per batch,
  its tokens/s while encoding and the share of the wall time it was encoding.

The clients run in this process, on the same cores as the service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np

from ..config import parse_int_list, parse_name_list
from ..embedder import Embedder
from ..model.builder import build_model_dir
from ..model.cpu import CPU_WORKER_ENV, default_threads
from ..serve.config import ServeConfig
from ..tokenize import TextTokenizer
from .workload import emit, machine, texts_of_lengths

QUERY_MEDIAN_TOKENS = 14.0


def query_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Query lengths in tokens (prefix, ``<s>``, ``</s>`` included): median ~14, 6 to 48."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(QUERY_MEDIAN_TOKENS), 0.45, n)).round().astype(np.int64)
    return np.clip(lengths, 6, 48)


def ceiling(model_dir: Path, texts: list[str], args) -> dict:
    """``Embedder.encode`` alone on the same texts, all at once and one by one, in a child
    process started as an encoder replica is (on CPU: ``OMP_NUM_THREADS`` and the allocator's
    settings before torch starts; without them single-text latencies here varied 0.14-2.9 s
    under load instead of 0.12 s)."""
    env = CPU_WORKER_ENV | {"OMP_NUM_THREADS": str(default_threads(1))} \
        if args.device == "cpu" else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            return pool.submit(_ceiling, str(model_dir), texts, args.device, args.dtype,
                               args.dims[0]).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _ceiling(model_dir: str, texts: list[str], device: str, dtype: str, width: int) -> dict:
    embedder = Embedder.from_pretrained(model_dir, device=device, dtype=dtype)
    embedder.encode(texts, task="query", dims=(width,))  # warm-up: every batch shape once
    batched = min(_timed(embedder.encode, texts, task="query", dims=(width,))
                  for _ in range(3))
    alone = [_timed(embedder.encode, [text], task="query", dims=(width,)) for text in texts[:32]]
    tokens = int(embedder.tokenize(texts, "query").lengths.sum())
    return {"texts": len(texts), "tokens": tokens,
            "texts_per_s": round(len(texts) / batched, 1),
            "tokens_per_s": round(tokens / batched, 1),
            "one_text_p50_ms": round(1000 * float(np.percentile(alone, 50)), 1),
            "one_text_texts_per_s": round(len(alone) / sum(alone), 1)}


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


async def drive(url: str, texts: list[str], clients: int, requests: int,
                width: int) -> dict:
    """``requests`` requests of one text each from ``clients`` closed-loop clients."""
    latencies: list[float] = []
    failed: list[int] = []  # statuses of the requests that were not answered 200
    todo = iter(range(requests))

    async def client(session) -> None:
        for i in todo:
            body = {"input": texts[i % len(texts)], "dimensions": width,
                    "encoding_format": "base64"}
            t0 = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.read()
            if r.status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failed.append(r.status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 8),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": requests, "failed": len(failed),
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def service(model_dir: Path, texts: list[str], args, batching: str) -> list[dict]:
    """The service started with one way of batching, driven at each client count."""
    from ..serve.server import running  # lazy: Ray Serve (the other benchmarks need no Ray)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(model=str(model_dir), dims=args.dims, port=port, device=args.device,
                         dtype=args.dtype, batching=batching,
                         encoder_threads=args.encoder_threads, max_queued_tokens=1 << 20)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    levels = []
    with running(config) as svc:
        asyncio.run(drive(url, texts, 8, 32, args.dims[0]))  # warm-up: connections, kernels
        for c in args.clients:
            before = svc.encoder_stats()
            level = asyncio.run(drive(url, texts, c, max(args.requests, 4 * c), args.dims[0]))
            after = svc.encoder_stats()
            done = {k: after[k] - before[k] for k in after}
            levels.append(level | {
                "requests_per_batch": round(done["pieces"] / max(done["batches"], 1), 1),
                "encoder_tokens_per_s": round(done["tokens"] / max(done["encode_s"], 1e-9), 1),
                "encoder_busy": round(done["encode_s"] / level["wall_s"], 2)})
    return levels


def bench_serve(args) -> dict:
    # The small (test) tokenizer: a query's cost here is the encoder's; texts are made to the
    # token lengths of the mix whatever the tokenizer.
    model_dir = Path(args.model_dir or f"models/bench-{args.size}-small-tokenizer")
    if not (model_dir / "config.json").is_file():
        print(f"building a random-weight {args.size} model in {model_dir} ...", flush=True)
        build_model_dir(model_dir, args.size, seed=0, tokenizer="small")
    tokenizer = TextTokenizer.from_dir(model_dir)
    texts = texts_of_lengths(query_lengths(args.texts, args.seed), tokenizer, args.seed)
    alone = ceiling(model_dir, texts, args)
    result = {"benchmark": "serve", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "model": args.size, "tokenizer": "small", "device": args.device,
              "dtype": args.dtype,
              "width": args.dims[0], "encoder_threads": args.encoder_threads or "cores",
              "ceiling": alone}
    for batching in args.batching:
        levels = service(model_dir, texts, args, batching)
        for level in levels:
            level["vs_ceiling"] = round(level["requests_per_s"] / alone["texts_per_s"], 3)
        result[f"batching_{batching}"] = levels
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--size", choices=("tiny", "real"), default="real")
    parser.add_argument("--model-dir", default=None,
                        help="default models/bench-<size>-small-tokenizer")
    parser.add_argument("--texts", type=int, default=256, help="distinct query texts")
    parser.add_argument("--requests", type=int, default=256,
                        help="requests per client count (at least 4 per client)")
    parser.add_argument("--clients", default="1,8,64", help="concurrent client counts")
    parser.add_argument("--batching", default="queue,serve-batch,off",
                        help="the service's --batching modes to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--encoder-threads", type=int, default=None,
                        help="torch threads of the service's encoder replica (default: cores)")
    parser.add_argument("--dims", default=None, help="widths served; requests ask the first "
                        "(default 768,512,256; 64,32 tiny)")
    parser.add_argument("--json", help="also write the result to this file")


def main(args) -> None:
    args.clients = parse_int_list(args.clients, "--clients")
    args.batching = parse_name_list(args.batching)
    args.dims = parse_int_list(args.dims or ("64,32" if args.size == "tiny" else "768,512,256"),
                               "--dims")
    emit(bench_serve(args), args.json)
