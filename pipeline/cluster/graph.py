"""The Ray Data graph: the one place that wires the stages with Ray.

    read shards (ShardDatasource) -> TokenizeStage actors -> EncodeStage actors
        -> write tasks (one file per unit per batch) -> records the driver consumes

On CPU the encoder actors tokenize their own windows by default (TokenizeEncodeStage: no
tokenizer actors; ``pipeline/plan.py``).

Everything it wires is built from a :class:`~pipeline.plan.RunPlan`; the stages and the I/O
functions it calls live in modules that do not import Ray. The nightly job's graph adds the
diff against the previous snapshot (``pipeline/stages/diff.py``) before the tokenizers.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset, ExecutionResources
from ray.data.context import ShuffleStrategy
from ray.data.block import Block, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..errors import RunFailed, root_cause
from ..io import schema as S
from ..io.readers import ReadSpec, Skipped, files_read, read_unit
from ..io.storage import InputFile, open_filesystem
from ..io.writers import OutputSpec, write_outputs
from ..plan import RunPlan
from ..stages.carry import MemberCopy, copy_members
from ..stages.diff import (MAX_TODAY_IDS, Diff, diff_bucket, hash_rows, read_previous,
                           read_previous_documents, read_seen, read_touched, today_ids)
from ..stages.embed import EncodeStage, TokenizeEncodeStage, TokenizeStage
from .expert_groups import RankGroup

log = logging.getLogger("pipeline.graph")


class ShardDatasource(Datasource):
    """The run's shards as Ray read tasks, each reading whole files through fsspec.

    The driver already listed the files with their sizes, so no task or driver call looks
    them up again (Ray's file-based reader would ask the store for each path, one by one,
    before the run starts). S3 requests retry transient errors with backoff (botocore's
    standard mode, ``io/storage.py``); a permanent error fails the read naming the object.
    """

    def __init__(self, files: Iterable[InputFile], fmt: str, spec: ReadSpec,
                 storage_options: dict[str, Any],
                 skipped: dict[str, Skipped] | None = None) -> None:
        super().__init__()
        self._files, self._format = list(files), fmt
        self._spec, self._storage_options = spec, storage_options
        self._skipped = skipped or {}  # units some of whose files are not read, by name

    def estimate_inmemory_data_size(self) -> int:
        # The bytes to read: a night's touched unit reads its changed files alone (Ray Data
        # sizes the read by this: counting the copied ones made a 1% night at 100,000 files
        # read its 1,000 changed files in 200 tasks of 5; now in 2 per CPU).
        return sum(m.size for f in self._files for m in files_read(f, self._skipped.get(f.unit)))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                       data_context=None) -> list[ReadTask]:
        read = {f.unit: files_read(f, self._skipped.get(f.unit)) for f in self._files}
        return [ReadTask(named_task(read_files, group, self._format, self._spec,
                                    self._storage_options,
                                    {f.unit: self._skipped[f.unit] for f in group
                                     if f.unit in self._skipped}),
                         _metadata([(m.uri, m.size) for f in group for m in read[f.unit]]))
                for group in deal(self._files, parallelism,
                                  lambda f: sum(m.size for m in read[f.unit]))]


def named_task(fn, *args, **kwargs):
    """``fn`` bound to its arguments as a plain function named after ``fn`` (Ray Data names a
    large read task after its function, which a ``functools.partial`` does not have)."""
    def task():
        return fn(*args, **kwargs)
    task.__name__ = task.__qualname__ = fn.__name__
    return task


def deal(files: list, parallelism: int, size) -> list[list]:
    """Files in at most ``parallelism`` groups of similar bytes, each file whole: largest
    first, dealt round-robin."""
    ordered = sorted(files, key=lambda f: -size(f))
    n = max(1, min(parallelism, len(ordered)))
    return [group for group in (ordered[i::n] for i in range(n)) if group]


def _metadata(files: list[tuple[str, int]]) -> BlockMetadata:
    return BlockMetadata(num_rows=None, size_bytes=sum(size for _, size in files),
                         input_files=tuple(uri for uri, _ in files), exec_stats=None)


def read_files(files: list[InputFile], fmt: str, spec: ReadSpec,
               storage_options: dict[str, Any],
               skipped: dict[str, Skipped] | None = None) -> Iterator[Block]:
    """Blocks of the given units, one after another (``fmt``: every file's, as listed)."""
    for file in files:
        yield from read_unit(file, spec, storage_options, (skipped or {}).get(file.unit))


# Nights comparing fewer bytes than this (today's units to do and the previous snapshot's
# files) are grouped by a task-based sort shuffle; larger ones by Ray's default shuffle.
SMALL_SHUFFLE_BYTES = 1 << 30
# The sort shuffle's rows are first brought to at most this many blocks. It makes as many
# partitions as it gets blocks, and the driver owns each block's piece of each partition (held
# in the driver's own memory when small): n blocks cost n * n objects there. A 1% night over
# 2M rows, spread over 10,000 files, came with ~160 (today's rows, and one or more blocks
# per previous part file read).
SORT_SHUFFLE_BLOCKS = 64

STATS = "__stats"  # the write stage's output: one JSON record per unit and write


def write_batch(table: pa.Table, output_uri: str, storage_options: dict[str, Any],
                spec: OutputSpec) -> pa.Table:
    """Write one batch of encoded rows (files of one input file each); return its records."""
    t0 = time.perf_counter()
    fs, path = open_filesystem(output_uri, storage_options)
    records = write_outputs(fs, path, table, spec)
    share = (time.perf_counter() - t0) / max(len(records), 1)
    return pa.table({STATS: [json.dumps(r | {"write_s": share}) for r in records]})


def write_records(ds: Dataset) -> Iterator[dict[str, Any]]:
    """Run ``ds`` (a graph of this module) and yield its write records as they come: one per
    unit and write, with the unit's rows, rejects and files (``pipeline/io/writers.py``)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for text in batch[STATS].to_pylist():
            yield json.loads(text)


def build_dataset(plan: RunPlan) -> Dataset:
    """Read -> tokenize -> encode -> write, as a lazy Dataset of write records (JSON strings
    in ``__stats``); nothing runs until the driver iterates over it."""
    return embed_and_write(read_shards(plan), plan)


def read_shards(plan: RunPlan, skipped: dict[str, Skipped] | None = None) -> Dataset:
    return ray.data.read_datasource(
        ShardDatasource(plan.files, plan.format, plan.read, plan.storage_options, skipped)
    )


def build_nightly_dataset(plan: RunPlan, diff: Diff, copies: tuple[MemberCopy, ...] = ()
                          ) -> tuple[Dataset, dict[str, Any]]:
    """Read -> content hash -> diff against the previous snapshot (rows of one id meet in one
    call after a shuffle) -> tokenize -> encode -> write; see ``pipeline/stages/diff.py``.

    ``diff`` holds the previous snapshot's part files (and document files), whether its
    embeddings are reused, the bucket count and the one schema of the shuffle. A small night
    (under :data:`SMALL_SHUFFLE_BYTES` to compare) is grouped by Ray Data's task-based sort shuffle,
    which starts no aggregator actors (a night of a few thousand rows took 3.1-3.4 s instead
    of 7.0-7.2 s here), on rows brought to a few blocks first (:data:`SORT_SHUFFLE_BLOCKS`);
    a large one by Ray Data's default shuffle (hash-based in Ray 2.60).

    ``copies``: touched units whose unchanged files' rows are copied from the previous
    snapshot (``pipeline/stages/carry.py``), by read tasks of their own whose write records
    join the graph's; only the units' changed files are read.

    With ``diff.gather_today`` (the ids already in the snapshot outnumber today's rows),
    today's rows are read and hashed first (:func:`gather_today`), and the ids already in the
    snapshot enter the shuffle only where today's rows may hold them. Returns the dataset and
    ``{"today_ids": n}`` (the distinct ids gathered; None when not gathered).
    """
    small = diff.bytes < SMALL_SHUFFLE_BYTES
    DataContext.get_current().shuffle_strategy = (
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if small
        else DataContext().shuffle_strategy)  # before the dataset is made: it copies the context
    ds = read_shards(plan, {c.unit: c.skipped for c in copies}).map_batches(
        hash_rows, batch_format="pyarrow",
        fn_kwargs={"task": diff.task, "buckets": diff.buckets, "schema": diff.schema},
    )
    today, gathered = None, None
    if diff.gather_today:
        ds, today, gathered = gather_today(ds)
    tasks = diff.for_tasks()  # each task carries only its own files
    if diff.previous_files:
        previous = ray.data.read_datasource(FunctionDatasource(
            diff.previous_files, functools.partial(read_previous, diff=tasks,
                                                   storage_options=plan.storage_options)))
        ds = ds.union(previous)
    if diff.previous_documents:  # --doc-vectors: the reused documents' vectors
        documents = ray.data.read_datasource(FunctionDatasource(
            diff.previous_documents, functools.partial(
                read_previous_documents, diff=tasks, storage_options=plan.storage_options)))
        ds = ds.union(documents)
    if diff.seen_files:
        seen = ray.data.read_datasource(FunctionDatasource(
            [(uri, 0) for uri, _ in diff.seen_files],
            functools.partial(with_today, read_seen, today, diff=tasks,
                              storage_options=plan.storage_options),
            args={uri: (source,) for uri, source in diff.seen_files}))
        ds = ds.union(seen)
    if diff.touched_files:  # their changed files' previous rows, their copied files' ids
        touched = ray.data.read_datasource(FunctionDatasource(
            list(diff.touched_files),
            functools.partial(with_today, read_touched, today, diff=tasks,
                              storage_options=plan.storage_options),
            args=diff.touched))
        ds = ds.union(touched)
    if small:  # split and combined, not shuffled (see SORT_SHUFFLE_BLOCKS)
        ds = ds.repartition(min(diff.buckets, SORT_SHUFFLE_BLOCKS))
    ds = ds.groupby(S.BUCKET, num_partitions=diff.buckets).map_groups(
        diff_bucket, batch_format="pyarrow", fn_kwargs={"diff": tasks},
    )
    written, facts = embed_and_write(ds, plan), {"today_ids": gathered}
    if not copies:
        return written, facts
    copied = ray.data.read_datasource(FunctionDatasource(
        [(c.unit, c.bytes) for c in copies],
        functools.partial(copy_records, storage_options=plan.storage_options),
        args={c.unit: (c,) for c in copies}))
    return written.union(copied), facts


def gather_today(ds: Dataset) -> tuple[Dataset, Any, int | None]:
    """Read and hash today's rows now (``ds``, materialized in the object store: the shuffle
    after it holds them all anyway), and gather their ids' hashes (``stages/diff.py::
    today_ids``, 8 bytes an id) for the readers of the ids already in the snapshot. Returns
    today's rows, the hashes' object reference and their count (None and None past
    :data:`~pipeline.stages.diff.MAX_TODAY_IDS` rows: no filter, and nothing fetched). A
    failure here is the run's, reported as :class:`RunFailed`."""
    try:
        ds = ds.materialize()
        rows = ds.count()  # from the blocks' metadata
        if rows > MAX_TODAY_IDS:
            log.info("today's rows are %d, more than %d: every id already in the snapshot "
                     "enters the diff", rows, MAX_TODAY_IDS)
            return ds, None, None
        blocks = ds.to_arrow_refs()
        parts = ray.get([_today_ids.remote(*blocks[i:i + BLOCKS_PER_TASK])
                         for i in range(0, len(blocks), BLOCKS_PER_TASK)])
    except Exception as err:  # noqa: BLE001 - reported whole, with its type (as run.consume)
        cause = root_cause(err)
        raise RunFailed(f"the run failed: {type(cause).__name__}: {cause}") from err
    hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
    return ds, ray.put(hashes), len(hashes)


BLOCKS_PER_TASK = 32  # of today's rows, hashed by one task (a block is a read task's table)


@ray.remote(num_cpus=1)
def _today_ids(*blocks: pa.Table) -> np.ndarray:
    return np.unique(np.concatenate([today_ids(b) for b in blocks]))


def with_today(read, today, uri: str, *args, **kwargs) -> Iterator[Block]:
    """``read(uri, *args, **kwargs)`` given today's ids (``today``: their object reference,
    or None), fetched in the task that reads."""
    yield from read(uri, *args, today=None if today is None else ray.get(today), **kwargs)


def copy_records(_unit: str, job: MemberCopy,
                 storage_options: dict[str, Any]) -> Iterator[Block]:
    """The write record of one touched unit's copied rows (``copy_members``), as a block
    (``_unit``: the unit's name, as the datasource lists it)."""
    yield pa.table({STATS: [json.dumps(copy_members(job, storage_options))]})


class FunctionDatasource(Datasource):
    """Read tasks of ``(uri, size)`` files, dealt by size; ``read(uri, *args[uri])`` yields a
    file's blocks (``args``: a file's further arguments, carried by its task only)."""

    def __init__(self, files: list[tuple[str, int]], read,
                 args: dict[str, tuple] | None = None) -> None:
        super().__init__()
        self._files, self._read, self._args = list(files), read, args or {}

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self._files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(named_task(_read_all, [(uri, self._args.get(uri, ())) for uri, _ in group],
                                    self._read), _metadata(group))
                for group in deal(self._files, parallelism, lambda f: f[1])]


def _read_all(files: list[tuple[str, tuple]], read) -> Iterator[Block]:
    for uri, args in files:
        yield from read(uri, *args)


def limit_resources(plan: RunPlan) -> None:
    """Keep Ray Data's tasks off the resources expert-parallel ranks hold.

    The ranks are actors of their own placement groups, which Ray Data does not see; without
    a limit it would plan its read and write tasks on those CPUs too. Set on every run (a
    driver may run several), from the cluster's total at planning time, before the run's
    dataset is made (a Dataset keeps a copy of the context it was made with).
    """
    options = DataContext.get_current().execution_options
    if plan.encode.ranks > 1:
        total, ranks = ray.cluster_resources(), plan.encode.actors * plan.encode.ranks
        options.resource_limits = ExecutionResources(
            cpu=total.get("CPU", 0.0) - ranks * plan.encode.rank_cpus,
            gpu=total.get("GPU", 0.0) - ranks * plan.encode.rank_gpus)
    else:
        options.resource_limits = ExecutionResources.for_limits()


def encode_kwargs(plan: RunPlan) -> dict[str, Any]:
    """The encode stage's arguments; with ``--expert-parallel`` its engine is a group of rank
    actors (each encode actor makes its own group when it starts)."""
    encode = plan.encode
    if encode.ranks == 1:
        return encode.kwargs
    return encode.kwargs | {"engine": functools.partial(
        RankGroup, encode.ranks, name=encode.group, threads=encode.kwargs["threads"] or None,
        replicas=encode.kwargs["replicas"])}


def embed_and_write(ds: Dataset, plan: RunPlan) -> Dataset:
    """Tokenize -> encode -> write ``ds``'s rows; a Dataset of write records. With no
    tokenizer actors in the plan (a CPU run's default) the encoder actors tokenize."""
    stage, kwargs = EncodeStage, encode_kwargs(plan)
    if plan.tokenize.actors:
        ds = ds.map_batches(
            TokenizeStage, fn_constructor_kwargs=plan.tokenize.kwargs,
            batch_size=plan.tokenize.batch_rows, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=plan.tokenize.actors),
            num_cpus=plan.tokenize.num_cpus,
            **({"runtime_env": {"env_vars": plan.tokenize.env_vars}} if plan.tokenize.env_vars
               else {}),
        )
    else:
        stage, kwargs = TokenizeEncodeStage, kwargs | {"tokenize": plan.tokenize.kwargs}
    # Merged by Ray with the job's runtime_env (working_dir, credentials by reference).
    env = {"runtime_env": {"env_vars": plan.encode.env_vars}} if plan.encode.env_vars else {}
    ds = ds.map_batches(
        stage, fn_constructor_kwargs=kwargs,
        batch_size=plan.encode.batch_rows, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.encode.actors),
        num_cpus=plan.encode.num_cpus, num_gpus=plan.encode.num_gpus, **env,
    )
    # Tasks, so a write that dies is retried by Ray; the files of a failed attempt are named
    # by no record, never committed, and deleted at the end of the run.
    return ds.map_batches(
        write_batch, batch_size=plan.rows_per_file, batch_format="pyarrow",
        fn_kwargs={"output_uri": plan.output_uri, "storage_options": plan.storage_options,
                   "spec": plan.output},
        num_cpus=1,
    )
