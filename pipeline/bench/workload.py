"""What the benchmarks run on, in one place: length mixes, synthetic token ids, texts of
given token lengths, realistic multilingual texts and the real-size tokenizer they are
measured with, corpora written as Parquet shards, and the machine's description."""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from ..config import parse_int_list
from ..model import lexicon
from ..tokenize import TASK_PREFIXES, TextTokenizer


def length_mix(n: int, seed: int = 0, median: float = 110.0, max_len: int = 512) -> np.ndarray:
    """Passage lengths in tokens (incl. ``<s>``/``</s>``): log-normal, median ~110, tail to
    ``max_len``."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), 0.75, n)).round().astype(np.int64)
    return np.clip(lengths, 8, max_len)


def synthetic_ids(lengths: np.ndarray, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    seqs = []
    for n in lengths:
        s = rng.integers(4, min(vocab, 250002), n)
        s[0], s[-1] = 0, 2
        seqs.append(s)
    return seqs


def warm_up_ids(texts: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """The encoder benchmarks' warm-up texts: another mix than the timed one (seed + 1000, a
    quarter of the size), so the timed texts meet batch shapes the process has not seen."""
    warm = seed + 1000
    return synthetic_ids(length_mix(max(8, texts // 4), warm), vocab, warm)


def texts_of_lengths(lengths: np.ndarray, tokenizer: TextTokenizer, seed: int = 0) -> list[str]:
    """Texts whose token counts (with the document prefix, ``<s>`` and ``</s>``) follow ``lengths``."""
    from ..model.builder import sample_texts  # lazy: torch; this module stays torch-free

    words = " ".join(sample_texts()).split()
    rng = np.random.default_rng(seed)
    texts = []
    for target in lengths:
        start = int(rng.integers(len(words)))
        stream = (words * (2 + 4 * int(target) // len(words) + 1))[start:]

        def tokens(k: int) -> int:
            text = TASK_PREFIXES["document"] + " ".join(stream[:k])
            return int(tokenizer.encode([text]).lengths[0])

        lo, hi = 1, 4 * int(target)
        while lo < hi:  # the fewest words reaching the target length
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if tokens(mid) < target else (lo, mid)
        texts.append(" ".join(stream[:lo]))
    return texts


# The texts' length mix: log-normal around a median of ~110 tokens like length_mix, with the
# tail let past the model's 512 (about 2% of texts, truncated by the pipeline) up to this.
TEXT_MAX_TOKENS = 4096


@functools.cache
def lexicon_source(source: str) -> str:
    """``source`` resolved (:func:`pipeline.model.lexicon.resolve_source`), saying so once
    when ``auto`` falls back to synthetic words."""
    resolved = lexicon.resolve_source(source)
    if source == "auto" and resolved == "synthetic":
        print("wordfreq is not installed: the real-size tokenizer and the texts use synthetic "
              "words (pip install wordfreq for real ones)", file=sys.stderr, flush=True)
    return resolved


def real_tokenizer_json(source: str = "auto") -> str:
    """The real-size benchmark tokenizer (250,002 pieces; built once, then cached), as
    ``tokenizer.json`` text. ``source``: the lexicon, see :mod:`pipeline.model.lexicon`."""
    from ..model.builder import cached_real_size_tokenizer  # lazy: torch; see texts_of_lengths

    return cached_real_size_tokenizer(lexicon_source(source))


def multilingual_texts(n: int, tokenizer: Tokenizer, seed: int = 0, source: str = "auto",
                       max_tokens: int = TEXT_MAX_TOKENS) -> list[str]:
    """``n`` documents of made-up sentences, each in one language of the lexicon (uniformly
    drawn among its languages, 27 scripts, 7 of them written without spaces), words drawn by
    their frequency; lengths in tokens of ``tokenizer`` (untruncated, e.g.
    ``TextTokenizer.untruncated()``) follow a log-normal mix (median ~110,
    about 2% over the model's 512, up to ``max_tokens``); a text's length is aimed through its
    language's characters per token, so it lands within ~7% of its target (median).
    """
    langs = lexicon.languages(source)
    rng = np.random.default_rng(seed)
    targets = length_mix(n, seed, max_len=max_tokens)
    which = rng.integers(len(langs), size=n)
    # Characters per token of each language in this tokenizer, measured on one sample text.
    samples = [_sentences(lang, rng, 4000) for lang in langs]
    counts = [len(e.ids) for e in tokenizer.encode_batch(samples, add_special_tokens=False)]
    chars_per_token = [len(t) / c for t, c in zip(samples, counts)]
    return [_sentences(langs[k], rng, int(t * chars_per_token[k]))
            for k, t in zip(which.tolist(), targets.tolist())]


def _sentences(lang: lexicon.Language, rng: np.random.Generator, chars: int) -> str:
    """Sentences of ``lang`` until ``chars`` characters: 4-24 words each, the first one
    capitalised, a comma now and then, a number in one sentence of five."""
    space = " " if lang.spaced else ""
    out, size = [], 0
    while size < max(chars, 1):
        words = lang.draw(rng, int(rng.integers(4, 25)))
        words[0] = words[0][:1].upper() + words[0][1:]
        if rng.random() < 0.2:
            words.insert(int(rng.integers(len(words))), str(int(rng.integers(1, 10_000))))
        if len(words) > 8 and rng.random() < 0.5:
            words[len(words) // 2] += "," if lang.spaced else "，" if lang.code in ("zh", "ja") \
                else ""
        sentence = space.join(words) + lang.stop
        out.append(sentence)
        size += len(sentence) + 1
    text = " ".join(out) if lang.spaced or lang.stop == " " else "".join(out)
    return text[:max(chars, 1)].strip() or words[0]


def write_corpus(texts: list[str], out: Path, shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(texts)), shards)):
        table = pa.table({"id": pa.array(part, pa.int64()), "text": [texts[j] for j in part]})
        pq.write_table(table, out / f"part-{i:03d}.parquet")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # lazy: the data-only helpers above need no torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def add_job_arguments(parser) -> None:
    """The options of the benchmarks that run a job (``pipeline``, ``nightly``): model size,
    tokenizer and folder, corpus, device, dtype, widths, where to write the result."""
    parser.add_argument("--size", choices=("tiny", "real"), default="real")
    parser.add_argument("--tokenizer", choices=("real", "small"), default="real",
                        help="real: 250,002 pieces and multilingual texts (27 scripts); small: "
                             "the 1,000-piece test tokenizer and the bundled sample's words")
    parser.add_argument("--lexicon", choices=lexicon.SOURCES, default="auto",
                        help="words of the real-size tokenizer and texts (auto: wordfreq if "
                             "installed, else synthetic words)")
    parser.add_argument("--model-dir", default=None,
                        help="default models/bench-<size> (real tokenizer) or "
                             "models/bench-<size>-small-tokenizer")
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dims", default=None, help="widths (default 768,512,256; 64,32 tiny)")
    parser.add_argument("--json", help="also write the result to this file")


def bench_model_dir(args) -> Path:
    """``--model-dir``, or the default one of ``--size`` and ``--tokenizer``, built once (and
    built again when its tokenizer is not the kind asked for)."""
    from ..model.builder import REAL_TOKENIZER_VOCAB, build_model_dir  # lazy: torch (see above)

    suffix = "" if args.tokenizer == "real" else "-small-tokenizer"
    model_dir = Path(args.model_dir or f"models/bench-{args.size}{suffix}")
    built = (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    if built:
        real = TextTokenizer.from_dir(model_dir).vocab_size >= REAL_TOKENIZER_VOCAB
        if real == (args.tokenizer == "real"):
            return model_dir
        if args.model_dir:
            raise ValueError(f"--model-dir {model_dir} has a {'real' if real else 'small'}-size "
                             f"tokenizer; pass --tokenizer {'real' if real else 'small'}")
    print(f"building a random-weight {args.size} model ({args.tokenizer} tokenizer) in "
          f"{model_dir} ...", flush=True)
    return build_model_dir(model_dir, args.size, seed=0, tokenizer=args.tokenizer,
                           lexicon_source=lexicon_source(args.lexicon))


def bench_texts(args, model_dir: Path) -> list[str]:
    """``--texts`` texts of the benchmark mix for the model's tokenizer: multilingual texts for
    the real-size tokenizer, the bundled sample's words for the small one."""
    tokenizer = TextTokenizer.from_dir(model_dir)
    if args.tokenizer == "real":
        return multilingual_texts(args.texts, tokenizer.untruncated(), args.seed,
                                  lexicon_source(args.lexicon))
    return texts_of_lengths(length_mix(args.texts, args.seed), tokenizer, args.seed)


def job_dims(args) -> tuple[int, ...]:
    """``--dims``, or the default widths of the model size."""
    return parse_int_list(args.dims or ("64,32" if args.size == "tiny" else "768,512,256"),
                          "--dims")


def emit(result: dict, json_path: str | None) -> None:
    """Print a benchmark's result, and write it to ``--json`` when given."""
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
