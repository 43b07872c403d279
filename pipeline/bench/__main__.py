"""``python -m pipeline.bench {encoder,pipeline,nightly,ep,chunking,tokenizer,gpu,serve,
scale,parquet} [options]``: one benchmark a run."""

from __future__ import annotations

import argparse

from . import chunking, encoder, ep, gpu, nightly, parquet, pipeline, scale, serve, tokenizer

BENCHMARKS = {
    "encoder": (encoder, "encoder alone: packed path vs. straightforward baseline"),
    "pipeline": (pipeline, "the Ray Data job vs. the encoder alone (needs ray)"),
    "nightly": (nightly, "incremental nightly runs vs. a full run (needs ray)"),
    "ep": (ep, "expert parallelism vs. whole-model replicas (no Ray)"),
    "chunking": (chunking, "--long-text chunk vs. plain tokenization, one core (no Ray)"),
    "tokenizer": (tokenizer, "the tokenizer stage vs. raw encode_batch, real-size tokenizer, "
                             "one thread (no Ray)"),
    "gpu": (gpu, "everything a lent GPU should measure, one JSON (no Ray, no network)"),
    "serve": (serve, "the OpenAI /v1/embeddings service under 1, 8 and 64 concurrent clients (needs ray[serve])"),
    "scale": (scale, "many small files: driver RSS and CPU, per-file wall, summary and manifest "
                     "sizes, a resume of a run killed at 50%%, four nights (needs ray)"),
    "parquet": (parquet, "part files written and read with pyarrow's defaults vs. the writer's "
                         "encodings, one thread (no Ray)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    BENCHMARKS[args.what][0].main(args)


if __name__ == "__main__":
    main()
