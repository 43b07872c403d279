"""What the job entrypoints share: find the ``pipeline`` package and run one of its commands.

Inside a Ray job ``RAY_ADDRESS`` is set, so the run joins the job's cluster instead of starting
a local Ray. Exit statuses are the command's (0 done, 1 not reconciled, 2 setup mistake,
3 failed), so the job fails when the run does.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run_job(command: str) -> None:
    """``python -m pipeline <command> <this script's arguments>``, exiting with its status."""
    try:
        import pipeline  # noqa: F401 - installed in the image, or the job's working_dir
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.__main__ import main

    sys.exit(main([command, *sys.argv[1:]]))
