"""Ray job entrypoint for the embedding run: ``python -m pipeline run`` under ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/embed.py --input s3://lake/corpus/ --output s3://lake/embeddings/v2/

Every option of ``python -m pipeline run`` is accepted; the job's exit status is the run's.
"""

from _entry import run_job

if __name__ == "__main__":
    run_job("run")
