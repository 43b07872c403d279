"""``python -m pipeline``: the command line (``pipeline/cli.py``).

    python -m pipeline run --input URI --output URI [options]   the Ray Data embedding job
    python -m pipeline nightly --input URI --output URI [...]   a snapshot re-embedding only
                                                                 new and changed rows
    python -m pipeline enrich --input URI --output URI [...]    the source table back with
                                                                 embedding columns (Parquet,
                                                                 Iceberg)
    python -m pipeline demo [--out DIR]                          embed the bundled sample, offline
"""

import sys

from .cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
