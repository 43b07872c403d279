"""``python -m pipeline.bench pipeline``: the Ray Data job against the encoder alone.

Same machine, same texts (the encoder benchmark's length mix, as multilingual text for the
real-size tokenizer, the default; ``--tokenizer small`` for the test one), same model
(random weights of the chosen size, written once to ``--model-dir``), same device, dtype and
token budget. Reports:

* ``encoder_alone``: ``Embedder.embed_tokenized`` in this process, tokens already made;
* ``pipeline``: ``python -m pipeline run`` on a local Ray over Parquet shards of the same texts,
  end to end (actor start-up and model loading included) and steady (from the first encoder
  window's start to the last one's end), with its padding waste.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

from ..config import RunConfig
from ..embedder import Embedder
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
                       max_tokens_per_batch=args.max_tokens)
    summary = run(config)
    keep = ("rows_embedded", "tokens", "wall_s", "tokens_per_s", "tokens_per_s_steady",
            "padding_waste", "batch_padding", "stage_busy_s", "encoder_tokens_per_busy_s",
            "reconciled")
    return {k: summary[k] for k in keep}


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


def add_arguments(parser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=None)


def main(args) -> None:
    args.dims = job_dims(args)
    emit(bench_pipeline(args), args.json)
