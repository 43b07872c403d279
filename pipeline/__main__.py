"""``python -m pipeline``: command-line entry point.

    python -m pipeline run --input URI --output URI [options]   the Ray Data embedding job
    python -m pipeline demo [--out DIR]                          embed the bundled sample, offline
"""

from __future__ import annotations

import argparse
import json
import logging
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


def run(args: argparse.Namespace) -> int:
    """Pre-flight, run the Ray Data job, print the summary; exit 2 on a user error."""
    from .cli import config_from_args
    from .runner import run as run_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        result = run_job(config)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in result.items() if k not in ("config", "output_files")}
    print(json.dumps(shown, indent=2))
    if not result["reconciled"]:
        print("error: row counts do not reconcile: " + "; ".join(result["reconcile_problems"]),
              file=sys.stderr)
        return 1
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from .io.storage import InputError, OutputError, StorageError
    from .model.checkpoint import CheckpointError
    from .model.sources import ModelSourceError

    # ValueError covers bad option values, TokenizerError and UnsupportedConfigError.
    return (ValueError, InputError, OutputError, StorageError, ModelSourceError,
            CheckpointError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    from .cli import add_run_arguments

    p = sub.add_parser("run", help="embed a corpus with Ray Data (the main job)")
    add_run_arguments(p)
    p = sub.add_parser("demo", help="embed the bundled sample with an offline tiny model")
    p.add_argument("--model-dir", default="models/nomic-moe-tiny")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--task", default="document")
    p.add_argument("--dims", default="64,32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    return {"demo": demo, "run": run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
