"""``python -m pipeline``: command-line entry point.

    python -m pipeline run --input URI --output URI [options]   the Ray Data embedding job
    python -m pipeline nightly --input URI --output URI [...]   a snapshot re-embedding only
                                                                 new and changed rows
    python -m pipeline enrich --input URI --output URI [...]    the source table back with
                                                                 embedding columns (Parquet,
                                                                 Iceberg)
    python -m pipeline demo [--out DIR]                          embed the bundled sample, offline
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def demo(args: argparse.Namespace) -> int:
    """Embed the bundled sample corpus with the offline tiny model on a local Ray."""
    from importlib import resources

    from .config import RunConfig
    from .model.builder import build_model_dir

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, "tiny", seed=0)
        print(f"built tiny random-weight model in {model_dir}")
    corpus = resources.files("pipeline.data").joinpath("sample_corpus")
    # A demo is rerun often: replace its previous output (only the pipeline's own files).
    config = RunConfig(input=str(corpus), output=args.out, model=str(model_dir),
                       dims=args.dims, keep_columns=("lang",), overwrite=True,
                       progress=args.progress)
    return _run_and_report(config)


def run(args: argparse.Namespace) -> int:
    """Pre-flight, run the Ray Data job, print the summary; exit 2 on a user error."""
    from .cli import config_from_args

    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run_and_report(config, args.command)


def _job(command: str):
    if command == "enrich":
        from .enrich import run_enrich

        return run_enrich
    if command == "nightly":
        from .nightly import run_nightly

        return run_nightly
    from .runner import run as run_job

    return run_job


def _run_and_report(config, command: str = "run") -> int:
    from .runner import RunFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = _job(command)(config)
    except RunFailed as err:
        print(f"error: {str(err)[:4000]}", file=sys.stderr)
        return 3
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
    errors = (ValueError, InputError, OutputError, StorageError, ModelSourceError,
              CheckpointError, FileNotFoundError)
    if "pipeline.io.iceberg" in sys.modules:  # a catalog or table that cannot be reached
        errors += (sys.modules["pipeline.io.iceberg"].IcebergError,)
    return errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"demo": demo, "run": run, "nightly": run, "enrich": run}[args.command](args)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job (options from ``RunConfig``), and ``demo``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    from .cli import add_run_arguments

    p = sub.add_parser("run", help="embed a corpus with Ray Data (the main job)")
    add_run_arguments(p)
    p = sub.add_parser("nightly", help="re-embed a corpus into a new snapshot, encoding only "
                       "new and changed rows; _LATEST names the newest complete one")
    add_run_arguments(p, job="nightly")
    p = sub.add_parser("enrich", help="write the source table back with embedding columns "
                       "added, every row and column intact (Parquet folders, hive partitions, "
                       "Iceberg tables)")
    add_run_arguments(p, job="enrich")
    p = sub.add_parser("demo", help="embed the bundled sample corpus with an offline tiny "
                       "model on a local Ray")
    p.add_argument("--model-dir", default="models/nomic-moe-tiny",
                   help="where the tiny model is built on first use")
    p.add_argument("--out", default="out/demo", help="output folder (replaced on each run)")
    p.add_argument("--dims", default="64,32,16", help="widths (the tiny model is 64 wide)")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"))
    return parser


if __name__ == "__main__":
    sys.exit(main())
