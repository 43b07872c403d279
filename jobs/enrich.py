"""Ray job entrypoint for data-lake enrichment: ``python -m pipeline enrich``.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/enrich.py --input s3://lake/docs/ --output s3://lake/docs_enriched/

    ... python jobs/enrich.py --input iceberg:lake.docs --output iceberg:lake.docs \
        --iceberg-catalog-uri sqlite:////data/catalog.db --iceberg-warehouse s3://lake/warehouse

The source table comes back with ``embedding_<width>`` columns added, every row, column and
partition intact; an Iceberg table gets one new snapshot. Every option of ``enrich`` is accepted.
"""

from _entry import run_job

if __name__ == "__main__":
    run_job("enrich")
