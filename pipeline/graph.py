"""The Ray Data graph: the one place that wires the stages with Ray.

    read shards (ShardDatasource) -> TokenizeStage actors -> EncodeStage actors -> EmbeddingDatasink

Everything it wires is built from a :class:`~pipeline.plan.RunPlan`; the stages and the I/O
functions it calls live in modules that do not import Ray.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink, FileBasedDatasource

from .io.readers import ReadSpec, open_decompressed, read_jsonl, read_parquet
from .io.storage import InputFile, open_filesystem, to_uri
from .io.writers import OutputSpec, write_outputs
from .plan import RunPlan
from .stages import EncodeStage, TokenizeStage
from .summary import combine


class ShardDatasource(FileBasedDatasource):
    """Reads the run's shards with Ray Data's file reader (listing, retries with replay)."""

    def __init__(self, files: Iterable[InputFile], fmt: str, spec: ReadSpec,
                 storage_options: dict[str, Any]) -> None:
        files = list(files)
        fs, _ = open_filesystem(files[0].uri, storage_options)
        self._spec, self._format, self._fs = spec, fmt, fs
        paths = [fs._strip_protocol(f.uri) for f in files]
        # Our listing decided each file's compression (.gzip, .zstd, upper case included);
        # Ray's own guess from the name knows fewer suffixes and would pass raw bytes on.
        self._compression = {p: f.compression for p, f in zip(paths, files)}
        super().__init__(paths, filesystem=fs)

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._format == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access
        stream = filesystem.open_input_stream(path, compression=None)
        return open_decompressed(stream, self._compression.get(path))

    def _read_stream(self, f, path: str) -> Iterator[Block]:
        source = to_uri(self._fs, path)
        reader = read_parquet if self._format == "parquet" else read_jsonl
        yield from reader(f, source, self._spec)


class EmbeddingDatasink(Datasink[dict]):
    """Writes embedded rows as Parquet files and rejects under ``_rejects/``; sums statistics."""

    def __init__(self, output_uri: str, storage_options: dict[str, Any], spec: OutputSpec,
                 rows_per_file: int) -> None:
        self.output_uri, self.storage_options = output_uri, storage_options
        self.spec, self.rows_per_file = spec, rows_per_file
        self.stats: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        t0 = time.perf_counter()
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {}
        table = pa.concat_tables(tables, promote_options="permissive")
        fs, path = open_filesystem(self.output_uri, self.storage_options)
        stats = write_outputs(fs, path, table, self.spec)
        stats["files"] = [to_uri(fs, p) for p in stats["files"]]
        return stats | {"write_s": time.perf_counter() - t0}

    def on_write_complete(self, write_result) -> None:
        self.stats = combine(write_result.write_returns)


def build_dataset(plan: RunPlan) -> Dataset:
    """Read -> tokenize -> encode, as a lazy Dataset (nothing runs until it is written)."""
    ds = ray.data.read_datasource(
        ShardDatasource(plan.files, plan.format, plan.read, plan.storage_options)
    )
    ds = ds.map_batches(
        TokenizeStage, fn_constructor_kwargs=plan.tokenize.kwargs,
        batch_size=plan.tokenize.batch_rows, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.tokenize.actors), num_cpus=plan.tokenize.num_cpus,
    )
    # Merged by Ray with the job's runtime_env (working_dir, credentials by reference).
    env = {"runtime_env": {"env_vars": plan.encode.env_vars}} if plan.encode.env_vars else {}
    return ds.map_batches(
        EncodeStage, fn_constructor_kwargs=plan.encode.kwargs,
        batch_size=plan.encode.batch_rows, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.encode.actors),
        num_cpus=plan.encode.num_cpus, num_gpus=plan.encode.num_gpus, **env,
    )


def sink_for(plan: RunPlan) -> EmbeddingDatasink:
    return EmbeddingDatasink(plan.output_uri, plan.storage_options, plan.output, plan.rows_per_file)
