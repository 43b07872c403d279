"""``python -m pipeline.bench tokenizer``: the tokenizer stage against the raw tokenizer, one
thread, real-size tokenizer, realistic multilingual texts.

Rust's thread pool is limited to one thread (``RAYON_NUM_THREADS=1``, as a tokenizer actor
with one CPU), and the same texts (``workload.multilingual_texts``, 27 scripts, median ~110
tokens, ~2% over 512) go through:

* ``raw``: ``tokenizers.Tokenizer.encode_batch`` of the prefixed texts, untruncated: the
  least any tokenizer stage must do;
* ``raw_truncating``: the same with truncation at 512, as the stage's tokenizer is set;
* ``text_tokenizer``: ``pipeline.tokenize.TextTokenizer.encode`` (cut, truncate, flat ids);
* ``stage``: ``pipeline.stages.embed.TokenizeStage`` on an Arrow table of the rows (what a
  tokenizer actor runs per batch: validation, prefixes, the Arrow output columns).

Reports tokens/s of each (its own tokens: truncation keeps fewer), CPU core-seconds per
million tokens, the stage's share of the raw rate, and the characters per token. Best of
``--repeats`` passes. Needs no Ray and no model weights.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from ..io import schema as S
from ..model import lexicon
from ..stages.embed import TokenizeStage
from ..tokenize import TASK_PREFIXES, TextTokenizer
from .workload import emit, lexicon_source, machine, multilingual_texts, real_tokenizer_json


def add_arguments(parser) -> None:
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1024,
                        help="rows per stage call (a Ray Data batch of the tokenizer actor)")
    parser.add_argument("--lexicon", choices=lexicon.SOURCES, default="auto",
                        help="words of the texts and tokenizer (auto: wordfreq if installed)")
    parser.add_argument("--tokenizer-json", default=None,
                        help="another tokenizer.json to measure (default: the real-size one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")


def rows(texts: list[str]) -> pa.Table:
    """The reader's row layout (ids, texts, no rejects) the tokenizer stage takes."""
    n = len(texts)
    return pa.table({S.ID: pa.array(range(n), pa.int64()), S.TEXT: texts,
                     S.REJECT: pa.nulls(n, pa.string()), S.EXCERPT: pa.nulls(n, pa.string())})


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()  # CPU time of this process: one thread, so core-seconds
        fn()
        times.append(time.process_time() - start)
    return min(times)


def bench_tokenizer(args) -> dict:
    source = lexicon_source(args.lexicon)
    tokenizer_json = (open(args.tokenizer_json).read() if args.tokenizer_json
                      else real_tokenizer_json(source))
    tokenizer = TextTokenizer.from_json(tokenizer_json)
    raw = tokenizer.untruncated()
    texts = multilingual_texts(args.texts, raw, args.seed, source)
    prefixed = [TASK_PREFIXES["document"] + t for t in texts]
    truncating = tokenizer._tok  # set up as the stage's own: truncation at 512, no padding
    stage = TokenizeStage(tokenizer_json, "document")
    tables = [rows(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)]
    raw_tokens = sum(len(e.ids) for e in raw.encode_batch(prefixed))
    out = [stage(t) for t in tables]
    stage_tokens = int(sum(int(t[S.NUM_TOKENS].to_numpy().sum()) for t in out))
    batches = [prefixed[i:i + args.batch] for i in range(0, len(texts), args.batch)]
    paths = {
        "raw": (raw_tokens, lambda: [raw.encode_batch(b) for b in batches]),
        "raw_truncating": (stage_tokens, lambda: [truncating.encode_batch(b) for b in batches]),
        "text_tokenizer": (stage_tokens, lambda: [tokenizer.encode(b) for b in batches]),
        "stage": (stage_tokens, lambda: [stage(t) for t in tables]),
    }
    results = {}
    for name, (tokens, fn) in paths.items():
        seconds = best_seconds(fn, args.repeats)
        results[name] = {"tokens": tokens, "cpu_s": round(seconds, 3),
                         "tokens_per_s": round(tokens / seconds),
                         "core_s_per_million_tokens": round(seconds / tokens * 1e6, 3)}
    lengths = np.array([len(e.ids) for e in raw.encode_batch(prefixed)])
    return {
        "benchmark": "tokenizer", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "threads": 1, "lexicon": source, "vocab_size": tokenizer.vocab_size,
        "texts": len(texts), "languages": len(lexicon.languages(source)),
        "scripts": len({lang.script for lang in lexicon.languages(source)}),
        "chars_per_token": round(sum(map(len, prefixed)) / raw_tokens, 3),
        "tokens_median": float(np.median(lengths)), "texts_over_512": int((lengths > 512).sum()),
        "tokens_max": int(lengths.max()), "paths": results,
        "stage_vs_raw": round(results["stage"]["tokens_per_s"] / results["raw"]["tokens_per_s"], 3),
    }


def main(args) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core (before the tokenizers' pool starts)
    emit(bench_tokenizer(args), args.json)
