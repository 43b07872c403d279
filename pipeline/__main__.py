"""``python -m pipeline``: command-line entry point.

    python -m pipeline demo [--out DIR]   embed the bundled multilingual sample, offline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def demo(args: argparse.Namespace) -> int:
    """Build the tiny random-weight model if needed and embed the bundled sample with it."""
    import numpy as np

    from .embedder import Embedder
    from .model.builder import build_model_dir, sample_texts

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, "tiny", seed=0)
        print(f"built tiny random-weight model in {model_dir}")
    embedder = Embedder.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
    texts = sample_texts()
    t0 = time.perf_counter()
    dims = tuple(int(d) for d in args.dims.split(","))
    out = embedder.encode(texts, task=args.task, dims=dims)
    seconds = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "embeddings.npz"
    np.savez(path, **{f"embedding_{d}": v for d, v in out.items()})
    stats = embedder.last_stats
    summary = {"texts": stats.texts, "tokens": stats.tokens, "texts_truncated":
               stats.texts_truncated, "widths": list(dims), "seconds": round(seconds, 3),
               "output": str(path)}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embed the bundled sample with an offline tiny model")
    p.add_argument("--model-dir", default="models/nomic-moe-tiny")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--task", default="document")
    p.add_argument("--dims", default="64,32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    return {"demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
