"""Sources and sinks: sharded Parquet/JSONL over fsspec in, Parquet embeddings out. No Ray here."""
