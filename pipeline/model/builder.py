"""Random-weight models of the real architecture, written in the hub's layout.

No machine here reaches the hub, so tests and the offline demo use models this module builds:
``tiny`` (hidden 64, 4 layers, 4 experts, a small Unigram tokenizer trained offline that keeps
the XLM-R special ids) and ``real`` (768, 12 layers, 8 experts, 250048 vocab) for benchmarks.
Weights go through the same key map and checks as the official checkpoint.

Two tokenizers: ``small`` (1,000 pieces trained on the bundled sample: what the tests use) and
``real`` (250,002 pieces like XLM-R's, built from a many-language lexicon in seconds and
cached: what the benchmarks use, so that tokenizing costs what the real one costs per
character; see :func:`real_size_tokenizer`).

    python -m pipeline.model.builder --size tiny --out models/nomic-moe-tiny
    python -m pipeline.model.builder --size real --tokenizer real --out models/bench-real
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import heapq
import json
import math
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from .checkpoint import encoder_from_state, key_map, param_dtype
from .config import EncoderConfig, hub_config_dict
from .encoder import NomicMoEEncoder
from . import lexicon
from .sources import DEFAULT_CACHE, ENV_CACHE

REAL_CONFIG = EncoderConfig()
TINY_CONFIG = EncoderConfig(
    vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4, ffn_size=128, num_experts=4,
    top_k=2,
)
SIZES = {"tiny": TINY_CONFIG, "real": REAL_CONFIG}
TINY_TOKENIZER_VOCAB = 1000
REAL_TOKENIZER_VOCAB = 250_002  # XLM-R's: 4 specials, 249,997 pieces, <mask>
TOKENIZERS = ("small", "real")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in XLM-R


def random_hub_state(cfg: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 tensors under the hub's key names and shapes, scaled so activations stay O(1).

    Every tensor is non-trivial (LayerNorm affine, biases, token-type row, expert bias), and
    routers are scaled up so routing is decisive and spread over all experts.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    state = {}
    for _, hub, shape, _ in key_map(cfg):
        leaf = hub.rsplit(".", 1)[-1]
        if hub.endswith(("ln.weight", "norm1.weight", "norm2.weight")):
            state[hub] = normal(shape, 0.1, 1.0)
        elif leaf == "bias":
            state[hub] = normal(shape, 0.05)
        elif "router" in hub:
            state[hub] = normal(shape, 4.0 / cfg.hidden_size**0.5)
        elif "embeddings" in hub:
            state[hub] = normal(shape, 1.0)
        else:  # Linear-like [out, in] or stacked experts [E*F, D]: fan-in scaling
            fan_in = cfg.ffn_size if hub.endswith(("fc2.weight", "w2")) else cfg.hidden_size
            state[hub] = normal(shape, fan_in**-0.5)
    return state


def random_encoder(
    cfg: EncoderConfig, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, moe_backend: str = "auto",
) -> NomicMoEEncoder:
    """An in-memory encoder with :func:`random_hub_state` weights (no files)."""
    hub = random_hub_state(cfg, seed)
    state = {}
    for ours, key, _, transform in key_map(cfg):
        want = param_dtype(ours, dtype, torch.device(device).type)
        state[ours] = transform(hub.pop(key)).to(device=device, dtype=want).contiguous()
    return encoder_from_state(cfg, state, moe_backend)


def train_tokenizer(texts: list[str], vocab_size: int = TINY_TOKENIZER_VOCAB):
    """A small XLM-R-shaped Unigram tokenizer: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
    ``<mask>`` last; NFKC, Metaspace, ``<s> $A </s>`` post-processing (like the real one)."""

    trained = pipeline_parts(Tokenizer(models.Unigram()))
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 1, special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>", max_piece_length=12, show_progress=False,
    )
    trained.train_from_iterator(texts, trainer)
    # The trainer is multi-threaded: its piece set is stable, but scores and id order vary
    # between runs. Re-scoring the pieces by their frequency in the corpus, and sorting, makes
    # the built tokenizer byte-for-byte reproducible.
    pieces = [p for p, _ in json.loads(trained.to_str())["model"]["vocab"]]
    words = [w for text in texts for w, _ in trained.pre_tokenizer.pre_tokenize_str(
        trained.normalizer.normalize_str(text))]
    counts = {p: sum(w.count(p) for w in words) for p in pieces if p not in SPECIAL_TOKENS}
    total = sum(counts.values()) + len(counts)
    scored = sorted(((p, math.log((c + 1) / total)) for p, c in counts.items()),
                    key=lambda ps: (-ps[1], ps[0]))
    return xlmr_shaped(scored)


def pipeline_parts(tok: Tokenizer) -> Tokenizer:
    """XLM-R's normalizer and pre-tokenizer shape: NFKC (the real one compiles SentencePiece's
    NFKC table into a charsmap), runs of spaces collapsed, Metaspace."""
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def xlmr_shaped(scored: list[tuple[str, float]]) -> Tokenizer:
    """A Unigram tokenizer of ``scored`` pieces laid out as XLM-R's: ``<s>``=0, ``<pad>``=1,
    ``</s>``=2, ``<unk>``=3, the pieces, ``<mask>`` last; ``<s> $A </s>`` post-processing."""
    specials = [(p, 0.0) for p in SPECIAL_TOKENS]
    tok = pipeline_parts(Tokenizer(models.Unigram(specials + scored, unk_id=3)))
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


# Pieces are counted in this many of each language's most frequent words, up to this length.
PIECE_WORDS, PIECE_CHARS = 4000, 8
# Always in the vocabulary (as in XLM-R): printable ASCII, common punctuation.
BASE_CHARS = ("".join(chr(c) for c in range(33, 127))
              + "“”‘’«»—–…·、，。：；！？（）")


def real_size_tokenizer(source: str = "auto", vocab_size: int = REAL_TOKENIZER_VOCAB) -> Tokenizer:
    """An XLM-R-shaped Unigram tokenizer of ``vocab_size`` entries from a many-language lexicon
    (:mod:`pipeline.model.lexicon`), built without training, in seconds.

    Each language's pieces are the substrings of its frequent words (``▁`` before a word of a
    spaced script), weighted by word frequency; a piece's rank is its share of its language's
    characters (frequency x length), and its Unigram score the log of its frequency. The best
    ranked pieces over all languages fill the vocabulary, after every character the lexicon
    and the texts use (no ``<unk>`` on the benchmark texts). Deterministic for a source.
    """
    langs = lexicon.languages(source)
    chars = set(BASE_CHARS) | {s.stop for s in lexicon.SCRIPTS} | {"▁"}
    rank: dict[str, float] = {}
    logp: dict[str, float] = {}
    for lang in langs:
        letters = set("".join(lang.words))
        chars |= letters | set("".join(letters).upper())
        counts = _piece_counts(lang)
        total = sum(counts.values())
        for piece, count in counts.items():
            share = count / total
            if share * len(piece) > rank.get(piece, 0.0):
                rank[piece], logp[piece] = share * len(piece), math.log(share)
    room = vocab_size - len(SPECIAL_TOKENS) - 1 - len(chars)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the lexicon's {len(chars)} characters")
    chosen = heapq.nlargest(room, (p for p in rank if p not in chars), key=rank.__getitem__)
    floor = min(logp.values()) - 1.0  # a character alone is the last resort of a segmentation
    scored = [(p, logp.get(p, floor)) for p in sorted(chars)] + [(p, logp[p]) for p in chosen]
    scored.sort(key=lambda ps: (-ps[1], ps[0]))
    return xlmr_shaped(scored)


def _piece_counts(lang: lexicon.Language) -> dict[str, float]:
    """Frequency-weighted substrings of ``lang``'s frequent words (and of their capitalised
    form, at a tenth of the weight, for sentence starts)."""
    counts: dict[str, float] = collections.defaultdict(float)
    mark = "▁" if lang.spaced else ""
    for word, freq in zip(lang.words[:PIECE_WORDS], lang.freqs[:PIECE_WORDS].tolist()):
        forms = [(mark + word, freq)]
        if word[0].isalpha() and word[0].upper() != word[0]:
            forms.append((mark + word[0].upper() + word[1:], freq / 10))
        for form, weight in forms:
            n = len(form)
            for i in range(n):
                for j in range(i + 1, min(n, i + PIECE_CHARS) + 1):
                    counts[form[i:j]] += weight
    return counts


def cached_real_size_tokenizer(source: str = "auto", vocab_size: int = REAL_TOKENIZER_VOCAB,
                               cache_dir: str | os.PathLike | None = None) -> str:
    """:func:`real_size_tokenizer` as ``tokenizer.json`` text, built once per source and size
    into ``cache_dir`` (default: the model cache, ``$NOMIC_PIPELINE_CACHE``)."""
    source = lexicon.resolve_source(source)
    root = Path(cache_dir or os.environ.get(ENV_CACHE) or DEFAULT_CACHE).expanduser()
    key = hashlib.sha256(Path(__file__).read_bytes() + Path(lexicon.__file__).read_bytes())
    path = root / f"bench-tokenizer-{source}-{vocab_size}-{key.hexdigest()[:12]}.json"
    if path.is_file():
        return path.read_text()
    text = real_size_tokenizer(source, vocab_size).to_str()
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: concurrent builders write the same content
    return text


def sample_texts() -> list[str]:
    """The bundled multilingual sample (one text per line)."""
    text = resources.files("pipeline.data").joinpath("multilingual_sample.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _tokenizer_side_files(out: Path, cfg: EncoderConfig) -> None:
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "sep_token": "</s>", "pad_token": "<pad>", "cls_token": "<s>",
                "mask_token": "<mask>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tok_cfg = {"tokenizer_class": "XLMRobertaTokenizerFast", "model_max_length": 512, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def build_model_dir(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, cfg: EncoderConfig | None = None,
    with_tokenizer: bool = True, tokenizer: str = "small", lexicon_source: str = "auto",
) -> Path:
    """Write a complete hub-layout model directory with random weights; returns its path.

    ``cfg`` overrides ``size``. ``tokenizer``: ``small`` (trained on the bundled multilingual
    sample) or ``real`` (:func:`cached_real_size_tokenizer` of ``lexicon_source``);
    ``vocab_size`` grows to fit it if needed (multiple of 64, as the hub pads it).
    """
    cfg = cfg or SIZES[size]
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        tok = (Tokenizer.from_str(cached_real_size_tokenizer(lexicon_source))
               if tokenizer == "real" else
               train_tokenizer(sample_texts(), min(TINY_TOKENIZER_VOCAB, cfg.vocab_size)))
        needed = -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64
        if needed > cfg.vocab_size:
            cfg = dataclasses.replace(cfg, vocab_size=needed)
        tok.save(str(out / "tokenizer.json"))
        _tokenizer_side_files(out, cfg)
    config = hub_config_dict(cfg, name=f"random/nomic-moe-{size}-seed{seed}")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(random_hub_state(cfg, seed), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="small",
                        help="small: 1,000 pieces (tests); real: 250,002 pieces (benchmarks)")
    parser.add_argument("--lexicon", choices=lexicon.SOURCES, default="auto",
                        help="words of the real-size tokenizer (auto: wordfreq if installed)")
    args = parser.parse_args(argv)
    path = build_model_dir(args.out, args.size, args.seed, tokenizer=args.tokenizer,
                           lexicon_source=args.lexicon)
    print(f"wrote {args.size} random-weight model ({args.tokenizer} tokenizer) to {path}")


if __name__ == "__main__":
    main()
