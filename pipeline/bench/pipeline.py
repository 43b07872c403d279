"""``python -m pipeline.bench pipeline``: the Ray Data job against the encoder alone.

Same machine, same texts (the encoder benchmark's length mix, as multilingual text for the
real-size tokenizer, the default; ``--tokenizer small`` for the test one), same model
(random weights of the chosen size, written once to ``--model-dir``), same device, dtype and
token budget. Reports:

* ``encoder_alone``: ``Embedder.embed_tokenized`` in this process, tokens already made;
* ``pipeline``: ``python -m pipeline run`` on a local Ray over Parquet shards of the same texts,
  end to end (actor start-up and model loading included) and steady (from the first encoder
  window's start to the last one's end), with its padding waste.

``--encoder-rate R[,R...]`` runs the same job once per rate with the encoder's math replaced by
a stand-in taking ``tokens / R`` seconds (``pipeline/bench/rate.py``; GPU-sized windows and
token budget), and reports the tokens/s reached against ``R`` and the CPU core-seconds per
million tokens of each stage while the pipeline streams (read, tokenize, the encode stage
outside the math, write, driver, Ray's own workers and processes), their sum
``cpu_core_s_per_million_tokens`` (actor start-up, counted apart, left out) and the cores one
H100 needs at 1.5M tokens/s (``cores_per_h100_at_1_5M``); and, apart, what was spent before
and after the streaming (Ray's start, the pre-flight, the end of the run).
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from pathlib import Path

from ..config import RunConfig, parse_int_list
from ..embedder import Embedder
from ..plan import WINDOW_ROWS
from .rate import ONCE, CpuSampler, rate_spec
from .workload import (add_job_arguments, bench_model_dir, bench_texts, emit, job_dims, machine,
                       write_corpus)


def encoder_alone(model_dir: Path, texts: list[str], device: str, dtype: str,
                  max_tokens: int | None, dims: tuple[int, ...]) -> dict:
    embedder = Embedder.from_pretrained(model_dir, device=device, dtype=dtype,
                                        max_tokens_per_batch=max_tokens)
    batch = embedder.tokenize(texts, task="document")
    embedder.encode(texts[:8], dims=dims)  # warm-up: first-call kernel setup
    t0 = time.perf_counter()
    embedder.embed_tokenized(batch, dims)
    seconds = time.perf_counter() - t0
    tokens = int(batch.lengths.sum())
    stats = embedder.last_stats
    return {"tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "padding_waste": round(stats.attention_padding, 4),
            "max_tokens_per_batch": embedder.max_tokens_per_batch}


def pipeline_run(model_dir: Path, corpus: Path, out: Path, args) -> dict:
    from ..jobs.run import run  # lazy: ray (the encoder benchmarks run without it)

    config = RunConfig(input=str(corpus), output=str(out), model=str(model_dir), dims=args.dims,
                       device=args.device, dtype=args.dtype, overwrite=True, progress="off",
                       max_tokens_per_batch=args.max_tokens,
                       tokenizer_actors=args.tokenizer_actors)
    summary = run(config)
    layout = {"tokenizer_actors": summary["model"]["tokenizer_actors"]}  # 0: in the encoder
    keep = ("rows_embedded", "tokens", "wall_s", "tokens_per_s", "tokens_per_s_steady",
            "padding_waste", "batch_padding", "stage_busy_s", "encoder_tokens_per_busy_s",
            "reconciled")
    return {k: summary[k] for k in keep} | layout


def bench_pipeline(args) -> dict:
    model_dir = bench_model_dir(args)
    texts = bench_texts(args, model_dir)
    alone = encoder_alone(model_dir, texts, args.device, args.dtype, args.max_tokens, args.dims)
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(texts, Path(tmp) / "corpus", args.shards)
        piped = pipeline_run(model_dir, Path(tmp) / "corpus", Path(tmp) / "out", args)
    return {
        "benchmark": "pipeline", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "model": args.size, "tokenizer": args.tokenizer, "texts": args.texts,
        "device": args.device, "dtype": args.dtype, "encoder_alone": alone, "pipeline": piped,
        "steady_vs_alone": round(piped["tokens_per_s_steady"] / alone["tokens_per_s"], 3),
        "end_to_end_vs_alone": round(piped["tokens_per_s"] / alone["tokens_per_s"], 3),
    }


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """``values`` set in this process's environment for the block, then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


H100_TOKENS_PER_S = 1.5e6  # the encoder's target rate on one H100 (bf16)
GPU_WINDOW_ROWS = WINDOW_ROWS["cuda"]


def rate_run(model_dir: Path, corpus: Path, out: Path, rate: int, args) -> dict:
    """The job with the stand-in encoder at ``rate`` tokens/s; CPU seconds by stage."""
    from ..jobs.run import run  # lazy: ray (the encoder benchmarks run without it)

    config = RunConfig(input=str(corpus), output=str(out), model=str(model_dir), dims=args.dims,
                       device="cpu", overwrite=True, progress="off",
                       window_rows=args.window_rows or GPU_WINDOW_ROWS,
                       max_tokens_per_batch=args.max_tokens,
                       # Tokenizer actors of their own, as on a GPU node (a CPU run's
                       # encoder actors would tokenize their own windows).
                       tokenizer_actors=args.tokenizer_actors or 1)
    # The tokenizer's Rust thread pool per actor: Ray's workers inherit the driver's
    # environment when it starts the local Ray, as the run does.
    threads = {"RAYON_NUM_THREADS": str(args.tokenizer_threads)} if args.tokenizer_threads \
        else {}
    with environ(threads), CpuSampler() as cpu:
        summary = run(config, rate_spec(rate))
    tokens = summary["tokens"]

    def per_million(seconds: dict[str, float]) -> dict[str, float]:
        return {k: round(v / tokens * 1e6, 3) for k, v in sorted(seconds.items())}

    streaming = per_million(cpu.streaming)
    total = round(sum(v for k, v in streaming.items() if k != ONCE), 3)
    return {
        "encoder_rate": rate, "tokens": tokens, "rows_embedded": summary["rows_embedded"],
        "wall_s": summary["wall_s"], "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_steady": summary["tokens_per_s_steady"],
        "steady_vs_rate": round(summary["tokens_per_s_steady"] / rate, 3),
        "cpu_core_s_per_million_tokens_by_stage": streaming,
        "cpu_core_s_per_million_tokens_outside_streaming": per_million(cpu.outside),
        "cpu_core_s_per_million_tokens": total,
        "cores_per_h100_at_1_5M": round(total * H100_TOKENS_PER_S / 1e6, 2),
        "reconciled": summary["reconciled"],
    }


def bench_rates(args) -> dict:
    model_dir = bench_model_dir(args)
    texts = bench_texts(args, model_dir)
    rates = parse_int_list(args.encoder_rate, "--encoder-rate")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(texts, Path(tmp) / "corpus", args.shards)
        for rate in rates:
            runs.append(rate_run(model_dir, Path(tmp) / "corpus", Path(tmp) / f"out-{rate}",
                                 rate, args))
            print(f"rate {rate:,}: {runs[-1]['tokens_per_s_steady']:,.0f} tokens/s steady, "
                  f"{runs[-1]['cpu_core_s_per_million_tokens']} core-s per million tokens",
                  flush=True)
    last = runs[-1]
    return {
        "benchmark": "pipeline-rate", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "model": args.size, "tokenizer": args.tokenizer, "texts": args.texts,
        "shards": args.shards, "window_rows": args.window_rows or GPU_WINDOW_ROWS,
        "tokenizer_actors": args.tokenizer_actors or 1,
        "tokenizer_threads": args.tokenizer_threads,
        "runs": runs,
        # At top level: those of the last (highest, as given) rate.
        "cpu_core_s_per_million_tokens": last["cpu_core_s_per_million_tokens"],
        "cores_per_h100_at_1_5M": last["cores_per_h100_at_1_5M"],
    }


def add_arguments(parser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--encoder-rate", default=None, metavar="R[,R...]",
                        help="replace the encoder's math by a stand-in of R tokens/s (benchmark "
                             "only; see pipeline/bench/rate.py)")
    parser.add_argument("--window-rows", type=int, default=None,
                        help=f"with --encoder-rate: rows per encoder window (default "
                             f"{GPU_WINDOW_ROWS}, a GPU's)")
    parser.add_argument("--tokenizer-actors", type=int, default=None,
                        help="tokenizer actors (default: 1 with --encoder-rate, as on a GPU "
                             "node; else the run's: none on CPU, the encoder actors tokenize)")
    parser.add_argument("--tokenizer-threads", type=int, default=None,
                        help="with --encoder-rate: RAYON_NUM_THREADS of the Ray workers, the "
                             "tokenizer's threads per actor (default: its own, one per core)")


def main(args) -> None:
    args.dims = job_dims(args)
    emit(bench_rates(args) if args.encoder_rate else bench_pipeline(args), args.json)
