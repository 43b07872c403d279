"""The jobs users run, each a plain composition of the parts below it.

- ``run``: the embedding job, the :class:`~pipeline.jobs.run.JobSpec` that varies it, and the
  four phases every job goes through (resume state, plan, execute, finish).
- ``nightly``: snapshots that embed only new and changed rows (a spec: the diff before the
  tokenizers, a ``content_hash`` column, change counts in the summary).
- ``enrich``: the source table back with embedding columns (a staging run, then one Ray task
  per file rewrite; Parquet folders and Iceberg tables).
"""
