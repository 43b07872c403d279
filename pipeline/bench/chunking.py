"""``python -m pipeline.bench chunking``: what ``--long-text chunk`` costs on a CPU core.

Long multilingual documents (the bundled sample's 34 languages, shuffled into documents of
``--chars`` characters) are tokenized on one thread (Rust's pool limited to one) three ways:

* ``plain``: the whole document tokenized once, untruncated (``Tokenizer.encode_batch``):
  the least any chunker must do;
* ``truncate``: the tokenizer stage as a run without ``--long-text`` does it (the first 512
  tokens of a safe prefix of each document);
* ``chunk``: the tokenizer stage with ``--long-text chunk`` (windows planned on the
  document's tokens, every chunk tokenized again on its own).

Rates are in document tokens per second (each document's untruncated token count, whatever
a mode keeps of it). Also timed: one document of ``--big-mb`` MB chunked whole.
The tokenizer is the real-size benchmark one (250,002 pieces, ``workload.real_tokenizer_json``),
or that of ``--model-dir``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pyarrow as pa

from ..chunking import LongText
from ..io import schema as S
from ..model import lexicon
from ..model.builder import sample_texts
from ..stages.embed import TokenizeStage
from ..tokenize import TextTokenizer
from .workload import emit, machine, real_tokenizer_json


def add_arguments(parser) -> None:
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chars", type=int, default=20_000, help="characters per document")
    parser.add_argument("--big-mb", type=float, default=10.0)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--chunk-overlap", type=int, default=64)
    parser.add_argument("--model-dir", default=None,
                        help="a model folder whose tokenizer to use (default: the real-size one)")
    parser.add_argument("--lexicon", choices=lexicon.SOURCES, default="auto",
                        help="words of the real-size tokenizer (auto: wordfreq if installed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")


def documents(n: int, chars: int, seed: int) -> list[str]:
    texts, rng = sample_texts(), random.Random(seed)
    out = []
    for _ in range(n):
        parts, size = [], 0
        while size < chars:
            parts.append(rng.choice(texts))
            size += len(parts[-1]) + 1
        out.append(" ".join(parts)[:chars])
    return out


def rows(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table({S.ID: pa.array(range(n), pa.int64()), S.TEXT: texts,
                     S.REJECT: pa.nulls(n, pa.string()), S.EXCERPT: pa.nulls(n, pa.string())})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(args) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core (before the tokenizers' pool starts)
    tokenizer_json = (Path(args.model_dir) / "tokenizer.json").read_text() if args.model_dir \
        else real_tokenizer_json(args.lexicon)
    raw = TextTokenizer.from_json(tokenizer_json).untruncated()
    docs = documents(args.docs, args.chars, args.seed)
    tokens = sum(len(e.ids) for e in raw.encode_batch(docs, add_special_tokens=False))
    table = rows(docs)
    chunk = LongText("chunk", args.chunk_tokens, args.chunk_overlap, max_chunks=10**9)
    stages = {"truncate": TokenizeStage(tokenizer_json, "document"),
              "chunk": TokenizeStage(tokenizer_json, "document", chunk)}
    seconds = {"plain": timed(lambda: raw.encode_batch(docs, add_special_tokens=False))}
    for name, stage in stages.items():
        seconds[name] = timed(lambda: stage(table))
    chunked = stages["chunk"](table)
    chunks = sum(len(x) for x in chunked[S.CHUNK_LENGTHS].to_pylist())
    size, joined = int(args.big_mb * 1e6), " ".join(docs) + " "
    big = (joined * (size // len(joined) + 1))[:size]
    big_s = timed(lambda: stages["chunk"](rows([big])))
    emit({
        "benchmark": "chunking", "machine": machine(), "threads": 1,
        "tokenizer": args.model_dir or f"real-size ({lexicon.resolve_source(args.lexicon)})",
        "docs": args.docs, "chars_per_doc": args.chars, "document_tokens": tokens,
        "chunks": chunks, "window": args.chunk_tokens, "overlap": args.chunk_overlap,
        "tokens_per_s": {k: round(tokens / s) for k, s in seconds.items()},
        "chunk_vs_plain": round(seconds["plain"] / seconds["chunk"], 3),
        "big_document": {"chars": len(big), "seconds": round(big_s, 2)},
    }, args.json)
