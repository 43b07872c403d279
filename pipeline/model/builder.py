"""Random-weight models of the real architecture, written in the hub's layout.

No machine here reaches the hub, so tests and the offline demo use models this module builds:
``tiny`` (hidden 64, 4 layers, 4 experts, a small Unigram tokenizer trained offline that keeps
the XLM-R special ids) and ``real`` (768, 12 layers, 8 experts, 250048 vocab) for benchmarks.
Weights go through the same key map and checks as the official checkpoint.

    python -m pipeline.model.builder --size tiny --out models/nomic-moe-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from .checkpoint import encoder_from_state, key_map
from .config import EncoderConfig, hub_config_dict
from .encoder import NomicMoEEncoder

REAL_CONFIG = EncoderConfig()
TINY_CONFIG = EncoderConfig(
    vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4, ffn_size=128, num_experts=4,
    top_k=2,
)
SIZES = {"tiny": TINY_CONFIG, "real": REAL_CONFIG}
TINY_TOKENIZER_VOCAB = 1000
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
        want = torch.float32 if ours.endswith("router_ED") else dtype
        state[ours] = transform(hub.pop(key)).to(device=device, dtype=want).contiguous()
    return encoder_from_state(cfg, state, moe_backend)


def train_tokenizer(texts: list[str], vocab_size: int = TINY_TOKENIZER_VOCAB):
    """A small XLM-R-shaped Unigram tokenizer: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
    ``<mask>`` last; NFKC, Metaspace, ``<s> $A </s>`` post-processing (like the real one)."""

    def pipeline_parts(tok):
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        return tok

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
    specials = [(p, 0.0) for p in SPECIAL_TOKENS]
    tok = pipeline_parts(Tokenizer(models.Unigram(specials + scored, unk_id=3)))
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


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
    with_tokenizer: bool = True,
) -> Path:
    """Write a complete hub-layout model directory with random weights; returns its path.

    ``cfg`` overrides ``size``. With a tokenizer, the vocabulary is trained on the bundled
    multilingual sample and ``vocab_size`` grows to fit it if needed (multiple of 64, as the
    hub pads it).
    """
    cfg = cfg or SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        tok = train_tokenizer(sample_texts(), min(TINY_TOKENIZER_VOCAB, cfg.vocab_size))
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
    args = parser.parse_args(argv)
    path = build_model_dir(args.out, args.size, args.seed)
    print(f"wrote {args.size} random-weight model to {path}")


if __name__ == "__main__":
    main()
