"""Ray job entrypoint for the nightly re-embedding: ``python -m pipeline nightly``.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly_reembed.py --input s3://lake/corpus/ --output s3://lake/snapshots/

Each run writes a new snapshot under the output, encoding only new and changed rows, then
points ``<output>/_LATEST`` at it; a run that fails leaves ``_LATEST`` where it was, and the
next run resumes its unfinished snapshot. Every option of ``nightly`` is accepted.
"""

from _entry import run_job

if __name__ == "__main__":
    run_job("nightly")
