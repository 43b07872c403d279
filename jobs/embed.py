"""Ray job entrypoint for the embedding run: ``python -m pipeline run`` under ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/embed.py --input s3://lake/corpus/ --output s3://lake/embeddings/v2/

Every option of ``python -m pipeline run`` is accepted. Inside a Ray job ``RAY_ADDRESS`` is
set, so the run joins the job's cluster instead of starting a local Ray. Exit statuses are the
run's (0 done, 1 not reconciled, 2 setup mistake, 3 failed), so the job fails when the run does.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import pipeline  # noqa: F401 - installed in the image, or the job's working_dir
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
