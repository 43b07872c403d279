"""From a :class:`RunConfig` and what the cluster has to a :class:`RunPlan`. Pure, no Ray.

The plan holds every stage's constructor arguments, actor counts, batch sizes and resources;
``pipeline/cluster/graph.py`` only wires it. Tests read the plan to check that each option reaches the
stage that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from .config import RunConfig, resolve_device_type, resolve_dtype_name
from .io.readers import ReadSpec
from .io.schema import output_metadata
from .io.storage import InputFile
from .io.writers import MIN_FILE_ROWS, OutputSpec
from .model.config import check_dims, check_split
from .model.cpu import CPU_WORKER_ENV
from .tokenize import task_prefix

TOKENIZE_BATCH_ROWS = 1024
WINDOW_ROWS = {"cuda": 8192, "cpu": 1024}
# A write batch holds ~128 MiB of vectors by default (OutputSpec.rows_per_file: ~21,000 rows
# at 768/512/256), and a unit commits once its rows are written. A CPU encoder gives ~10 rows
# a second a node (~1,100 tokens/s in bf16 on 2 cores): units would stay uncommitted, and a
# kill would lose, ~35 minutes of work. On CPU a write batch is at most this many windows.
CPU_WRITE_WINDOWS = 4
# On GPU nodes: single-threaded tokenizer actors (RAYON_NUM_THREADS=1), ~6 per GPU: one
# real-size tokenizer actor does ~340k tokens/s on one core, two reach ~650k (threads
# inside one actor did not scale: ~420k with 2); an H100 takes ~1.5M tokens/s.
TOKENIZERS_PER_GPU = 6
TOKENIZER_GPU_ENV = {"RAYON_NUM_THREADS": "1"}
# On CPU the encoder is ~1,000x slower per token than the tokenizer (~1,000 tokens/s against
# ~300,000 per core here), so by default the encoder actors tokenize their own windows
# (``TokenizeEncodeStage``): one actor process less to start (a 25-row run on a warm local Ray:
# 3.0 s instead of 4.2 s, median of 6, 2026-12-06) and no token ids passed between actors.
# Rows are windowed as read, not as tokenized: vectors equal the two-actor layout's up to
# float32 rounding (a row's batch companions can differ). ``--tokenizer-actors N`` still gives
# separate tokenizer actors; an expert-parallel replica keeps one (its actor only coordinates).
TOKENIZE_IN_ENCODER = 0


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Logical resources of the Ray cluster the run uses."""

    cpus: float
    gpus: float
    node_cpus: float | None = None  # the largest node's (None: not known)
    node_gpus: float | None = None
    node_ids: tuple[str, ...] = ()  # the nodes alive when the run started


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model as the driver resolved and checked it."""

    source: str  # what the encoder actors resolve (hub id, local dir, fsspec prefix)
    model_id: str
    revision: str | None  # hub commit when resolved from the hub
    fingerprint: str
    hidden_size: int
    tokenizer_json: str = dataclasses.field(repr=False)
    num_experts: int = 8
    gguf: dict[str, Any] | None = None  # a GGUF source: its sha256, tensor types, expert bias

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "revision": self.revision,
                "weights_fingerprint": self.fingerprint, "hidden_size": self.hidden_size,
                } | ({"gguf": self.gguf} if self.gguf else {})


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One actor-pool stage: its constructor arguments, pool size, batch rows and resources."""

    kwargs: dict[str, Any] = dataclasses.field(repr=False)
    actors: int
    batch_rows: int
    num_cpus: float
    num_gpus: float = 0.0
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # set at process start
    ranks: int = 1  # expert-parallel ranks per actor; each holds rank_cpus CPUs, 1 GPU on CUDA
    group: str | None = None  # the name prefix of the run's expert-parallel placement groups
    rank_cpus: float = 0.0
    rank_gpus: float = 0.0

    @property
    def held_cpus(self) -> float:
        return self.actors * (self.num_cpus + self.ranks * self.rank_cpus)

    @property
    def held_gpus(self) -> float:
        return self.actors * (self.num_gpus + self.ranks * self.rank_gpus)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    files: tuple[InputFile, ...]
    format: str
    read: ReadSpec
    tokenize: StagePlan
    encode: StagePlan
    output_uri: str
    output: OutputSpec
    rows_per_file: int
    storage_options: dict[str, Any]
    device: str
    dtype: str  # the encoder's compute dtype, "auto" resolved


def encoder_replicas(config: RunConfig, device: str, cluster: Cluster) -> int:
    """Encoder replicas: one per GPU (per ``--expert-parallel`` GPUs), one on CPU."""
    ranks = config.expert_parallel
    if device == "cuda" and ranks > cluster.gpus:
        raise ValueError(f"--expert-parallel {ranks} needs {ranks} GPUs for one replica, the "
                         f"cluster has {cluster.gpus:g}")
    if ranks > 1:
        need = {"CPUs": ranks * 1.0} | ({"GPUs": ranks * 1.0} if device == "cuda" else {})
        have = {"CPUs": cluster.node_cpus, "GPUs": cluster.node_gpus}
        short = [f"{need[k]:g} {k}" for k in need if have[k] is not None and have[k] < need[k]]
        if short:
            raise ValueError(
                f"--expert-parallel {ranks} puts a group's ranks on one node and needs "
                f"{' and '.join(short)} there; the largest node has {cluster.node_cpus:g} CPUs "
                f"and {cluster.node_gpus or 0:g} GPUs")
    replicas = config.encoder_replicas or (int(cluster.gpus) // ranks if device == "cuda" else 1)
    if device == "cuda" and replicas * ranks > cluster.gpus:
        ep = f" with --expert-parallel {ranks}" if ranks > 1 else ""
        raise ValueError(f"--encoder-replicas {replicas}{ep} needs {replicas * ranks} GPUs, "
                         f"the cluster has {cluster.gpus:g}")
    return replicas


def write_rows(output: OutputSpec, device: str, window_rows: int) -> int:
    """Rows of a write batch by default: ~128 MiB of vectors, on CPU at most
    :data:`CPU_WRITE_WINDOWS` encoder windows (and never under the 1,024 rows that keep
    part files from being tiny where windows are small)."""
    rows = output.rows_per_file()
    if device != "cpu":
        return rows
    return min(rows, max(MIN_FILE_ROWS, CPU_WRITE_WINDOWS * window_rows))


def tokenizer_actors(config: RunConfig, device: str, replicas: int, cpus: float) -> int:
    """Tokenizer actors; 0: the encoder actors tokenize their own windows (on CPU, see
    :data:`TOKENIZE_IN_ENCODER`)."""
    if config.tokenizer_actors:
        return config.tokenizer_actors
    if device == "cuda":
        # Tokenising ~1M tokens/s takes several cores; keep some CPUs for reads and writes.
        gpus = replicas * config.expert_parallel
        return max(1, min(TOKENIZERS_PER_GPU * gpus, int(cpus) - gpus - 1))
    # An expert-parallel replica's actor only coordinates its ranks: tokenizers of their own.
    return 1 if config.expert_parallel > 1 else TOKENIZE_IN_ENCODER


def local_cpus(config: RunConfig, gpus: int, cpu_count: int) -> int:
    """CPUs to give a local Ray we start: the machine's, or enough for every actor plus I/O.

    Ray's CPUs are logical; on a small machine the actors would otherwise hold them all and
    leave none for read and write tasks, and the run would wait forever.
    """
    device = "cuda" if gpus and config.device != "cpu" else "cpu"
    replicas = config.encoder_replicas or (gpus // config.expert_parallel if device == "cuda"
                                           else 1)
    encoders = replicas * config.expert_parallel
    actors = tokenizer_actors(config, device, replicas, cpu_count) + encoders
    return max(cpu_count, actors + 2)


def check_fits(tokenize: StagePlan, encode: StagePlan, cluster: Cluster) -> None:
    """Refuse actor pools that would hold every CPU: read and write tasks would never run."""
    held = tokenize.held_cpus + encode.held_cpus
    if held + 1 > cluster.cpus:
        encoders = f"{encode.actors} encoder actor(s)" if encode.ranks == 1 else \
            f"{encode.actors} x {encode.ranks} expert-parallel rank(s)"
        actors = f"{tokenize.actors} tokenizer actor(s) and {encoders}" if tokenize.actors \
            else encoders
        lower = ("--tokenizer-actors, " if tokenize.actors else "") + \
            "--encoder-replicas or --expert-parallel"
        raise ValueError(
            f"{actors} hold {held:g} of the cluster's {cluster.cpus:g} CPUs, leaving none for "
            f"reading and writing (the run would wait forever); lower {lower}, or use a "
            "bigger cluster"
        )


def _rank_resources(ranks: int, device: str) -> dict[str, Any]:
    """An expert-parallel replica: the Ray Data actor only coordinates (no resources); each of
    its ranks holds one CPU, and one GPU on CUDA (pipeline/cluster/expert_groups.py)."""
    return {"num_cpus": 0.0, "num_gpus": 0.0, "ranks": ranks, "rank_cpus": 1.0,
            "rank_gpus": 1.0 if device == "cuda" else 0.0}


def plan_run(config: RunConfig, cluster: Cluster, model: ModelInfo, files: list[InputFile],
             id_type: pa.DataType | None, keep_types: tuple = (),
             group_name: str = "pipeline-ep") -> RunPlan:
    """The plan of a run; raises ``ValueError`` for settings the cluster or model cannot meet."""
    check_dims(config.dims, model.hidden_size)
    ranks = config.expert_parallel
    check_split(model.num_experts, ranks)
    device = resolve_device_type(config.device, cluster.gpus)
    replicas = encoder_replicas(config, device, cluster)
    tokenize = StagePlan(
        kwargs={"tokenizer_json": model.tokenizer_json, "task": config.task,
                "long_text": config.long_text_spec},
        actors=tokenizer_actors(config, device, replicas, cluster.cpus),
        batch_rows=TOKENIZE_BATCH_ROWS, num_cpus=1.0,
        env_vars=TOKENIZER_GPU_ENV if device == "cuda" else {},
    )
    encode = StagePlan(
        kwargs={
            "model": model.source, "revision": model.revision, "device": device,
            "gguf_expert_bias": config.gguf_expert_bias,
            "dtype": config.dtype, "dims": config.dims, "output_dtype": config.output_dtype,
            "max_tokens_per_batch": config.max_tokens_per_batch,
            "threads": config.encoder_threads, "replicas": replicas,
            "storage_options": config.storage_options, "fingerprint": model.fingerprint,
            "doc_vectors": config.doc_vectors,
        },
        actors=replicas, batch_rows=config.window_rows or WINDOW_ROWS[device],
        **(_rank_resources(ranks, device) | {"group": group_name} if ranks > 1 else
           {"num_cpus": 1.0, "num_gpus": 1.0 if device == "cuda" else 0.0,
            "env_vars": CPU_WORKER_ENV if device == "cpu" else {}}),
    )
    check_fits(tokenize, encode, cluster)
    metadata = output_metadata(
        model_id=model.model_id, revision=model.revision, fingerprint=model.fingerprint,
        task=config.task, prefix=task_prefix(config.task), dims=config.dims,
        output_dtype=config.output_dtype,
    )
    if config.long_text == "chunk":
        metadata |= {"chunks": config.long_text_spec.identity()}
    output = OutputSpec(config.id_column, config.keep_columns, config.dims,
                        config.output_dtype, metadata, long_text=config.long_text_spec)
    return RunPlan(
        files=tuple(files), format=files[0].format if files else "parquet",
        read=ReadSpec(config.id_column, config.text_column, config.keep_columns, id_type,
                      keep_types=tuple(keep_types),
                      dedupe=config.on_duplicate == "keep-first"),
        tokenize=tokenize, encode=encode, output_uri=config.output, output=output,
        rows_per_file=config.rows_per_file or write_rows(output, device, encode.batch_rows),
        storage_options=config.storage_options, device=device,
        dtype=resolve_dtype_name(config.dtype, device),
    )
