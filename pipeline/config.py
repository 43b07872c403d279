"""The run configuration: every option of ``python -m pipeline run``, typed and declared once.

The CLI (``pipeline/cli.py``) builds its arguments from these fields, so a default lives only
here. Values are checked when the config is built; checks that need the model (widths against
the model width) or the storage (paths, columns) happen in the pre-flight, before any heavy work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .chunking import CHUNK_COLUMNS, DEFAULT_MAX_CHUNKS, DEFAULT_OVERLAP, LONG_TEXT, LongText
from .model.config import DEFAULT_MODEL, MAX_SEQ_LEN
from .tokenize import TASK_PREFIXES

FORMATS = ("auto", "parquet", "jsonl")
OUTPUT_DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
PROGRESS = ("auto", "on", "off")
ON_DUPLICATE = ("keep-first", "keep-all")
ON_BAD_ROWS = ("reject", "fail")
# Options that belong to one job; ``run`` takes none of them.
JOB_OPTIONS = {
    "nightly": ("keep_snapshots",),
    "enrich": ("iceberg_catalog", "iceberg_catalog_uri", "iceberg_warehouse"),
}
# Options a job does not take (enrich keeps every column and matches rows by position; its
# chunk mode always appends document vectors).
JOB_EXCLUDES = {"enrich": ("keep_columns", "on_duplicate", "doc_vectors")}
# Internal column names start with this; user columns may not.
RESERVED_PREFIX = "__"


def _field(default: Any, help: str, *, metavar: str | None = None, choices=None, **kw):
    meta = {"help": help, "metavar": metavar, "choices": choices} | kw
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One embedding run: where from, where to, which model, and how to spread the work."""

    input: str = _field(None, "input file, prefix or glob (s3://, gs://, file://, local path)",
                        metavar="URI", required=True)
    output: str = _field(None, "output prefix for the Parquet files and _summary.json",
                         metavar="URI", required=True)
    model: str = _field(DEFAULT_MODEL, "hub id, local model directory or fsspec prefix",
                        metavar="SOURCE")
    revision: str | None = _field(None, "hub revision (branch, tag or commit) to pin",
                                  metavar="REV")
    gguf_expert_bias: str = _field("zero", "GGUF models: the MoE expert output bias GGUF files "
                                   "lack: zero (what llama.cpp computes) or a sidecar file from "
                                   "`python -m pipeline.model.gguf expert-bias` (docs/gguf.md)",
                                   metavar="zero|FILE")
    task: str = _field("document", "task prefix applied to every text",
                       choices=tuple(TASK_PREFIXES))
    dims: tuple[int, ...] = _field((768, 512, 256), "Matryoshka widths, comma separated",
                                   metavar="D,D,...")
    id_column: str = _field("id", "column holding the row id", metavar="NAME")
    text_column: str = _field("text", "column holding the text to embed", metavar="NAME")
    keep_columns: tuple[str, ...] = _field((), "columns carried through to the output unchanged",
                                           metavar="A,B,...")
    format: str = _field("auto", "input format (auto: by extension, .gz/.zst allowed)",
                         choices=FORMATS)
    output_dtype: str = _field("float32", "element type of the embedding columns",
                               choices=OUTPUT_DTYPES)
    device: str = _field("auto", "encoder device (auto: GPUs when the cluster has any)",
                         choices=DEVICES)
    dtype: str = _field("auto", "encoder compute dtype (auto: bfloat16 on GPU, float32 on CPU)",
                        choices=MODEL_DTYPES)
    encoder_replicas: int | None = _field(None, "encoder actors (default: one per GPU, else 1)",
                                          metavar="N")
    expert_parallel: int = _field(1, "ranks per encoder replica splitting the experts of every "
                                  "MoE layer (expert parallelism: N GPUs, or N CPU processes, "
                                  "exchanging tokens with all-to-all); 1: whole-model replicas "
                                  "(measured faster, see docs/expert-parallel.md)", metavar="N")
    tokenizer_actors: int | None = _field(None, "tokenizer actors (default: 6 per GPU; on "
                                          "CPU none, the encoder actors tokenize their own "
                                          "rows; 1 with --expert-parallel)", metavar="N")
    max_tokens_per_batch: int | None = _field(None, "token budget per encoder batch (default: "
                                              "by device and dtype)", metavar="N")
    window_rows: int | None = _field(None, "rows sorted together for length bucketing "
                                     "(default: 8192 on GPU, 1024 on CPU)", metavar="N")
    rows_per_file: int | None = _field(None, "rows per write batch; each unit's rows of a "
                                       "batch go to a file of their own (default: about 128 "
                                       "MiB of embeddings; on CPU at most 4 windows, never "
                                       "under 1024 rows, so that units commit every few "
                                       "minutes)", metavar="N")
    encoder_threads: int | None = _field(None, "torch threads per CPU encoder actor (default: "
                                         "the node's cores / replicas)", metavar="N")
    unit_bytes: int = _field(512 << 20, "Parquet files larger than this are split into units "
                             "of whole row groups of about this size (read in parallel, "
                             "committed and resumed apart)", metavar="BYTES")
    address: str | None = _field(None, "Ray cluster address (default: $RAY_ADDRESS, else a "
                                 "local Ray)", metavar="ADDR")
    s3_endpoint: str | None = _field(None, "S3-compatible endpoint URL (default: the AWS "
                                     "environment, e.g. AWS_ENDPOINT_URL)", metavar="URL")
    overwrite: bool = _field(False, "replace an earlier run at the output instead of resuming it "
                             "(needed when the model, widths, task or columns changed); "
                             "nightly: start a new snapshot instead of resuming an unfinished one")
    on_duplicate: str = _field("keep-first", "a repeated id within a shard: keep-first embeds "
                               "the first row and rejects the rest; keep-all embeds every row",
                               choices=ON_DUPLICATE)
    on_bad_rows: str = _field("reject", "a row that cannot be embedded: reject writes it to "
                              "_rejects/ with its reason; fail stops the run on the first one",
                              choices=ON_BAD_ROWS)
    max_reject_fraction: float = _field(0.1, "fail the run when more than this fraction of "
                                        "the rows read is rejected (1 disables the check)",
                                        metavar="F")
    long_text: str = _field("truncate", "a text over the model's 512 tokens: truncate keeps its "
                            "first 512 (counted as texts_truncated); chunk embeds it as "
                            "overlapping chunks, one output row each (docs/long-documents.md); "
                            "reject sends it to _rejects/ with its token count",
                            choices=LONG_TEXT)
    chunk_tokens: int = _field(MAX_SEQ_LEN, "chunk: model input tokens per chunk, the task "
                               "prefix and <s>/</s> included", metavar="N")
    chunk_overlap: int = _field(DEFAULT_OVERLAP, "chunk: tokens consecutive chunks share "
                                "(less than half the window)", metavar="N")
    max_chunks: int = _field(DEFAULT_MAX_CHUNKS, "chunk: a document needing more chunks is "
                             "rejected with the reason", metavar="N")
    keep_chunk_text: bool = _field(False, "chunk: write each chunk's text (chunk_text column)")
    doc_vectors: bool = _field(False, "chunk: also write one vector per document (the "
                               "token-weighted mean of its chunks) under _documents/")
    progress: str = _field("auto", "Ray Data progress bars (auto: when stderr is a terminal)",
                           choices=PROGRESS)
    # Options of one job only (see JOB_OPTIONS); the others ignore them.
    keep_snapshots: int = _field(7, "nightly: complete snapshots kept under the output, the "
                                 "newest included (older ones are deleted)", metavar="N")
    iceberg_catalog: str = _field("default", "enrich: the Iceberg catalog's name (configured in "
                                  "~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__* variables, "
                                  "else the embedded SQLite catalog)", metavar="NAME")
    iceberg_catalog_uri: str | None = _field(None, "enrich: the catalog's URI (sqlite:///..., "
                                             "postgresql://..., http(s):// for REST; default: "
                                             "<warehouse>/catalog.db)", metavar="URI")
    iceberg_warehouse: str | None = _field(None, "enrich: the Iceberg warehouse (local path or "
                                           "s3://) of the embedded catalog", metavar="URI")

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a URI or path, got {getattr(self, name)!r}")
        for name in ("task", "format", "output_dtype", "device", "dtype", "progress",
                     "on_duplicate", "on_bad_rows", "long_text"):
            allowed = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        object.__setattr__(self, "dims", _dims(self.dims))
        object.__setattr__(self, "keep_columns", tuple(self.keep_columns))
        for name in ("encoder_replicas", "expert_parallel", "tokenizer_actors", "max_tokens_per_batch",
                     "window_rows", "rows_per_file", "encoder_threads", "unit_bytes",
                     "keep_snapshots", "chunk_tokens", "max_chunks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < MAX_SEQ_LEN:
            raise ValueError(f"max_tokens_per_batch must be at least {MAX_SEQ_LEN} (one "
                             f"sequence of the longest length), got {self.max_tokens_per_batch}")
        fraction = self.max_reject_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be a number from 0 to 1, got {fraction!r}")
        self._check_columns()
        self._check_long_text()

    def _check_long_text(self) -> None:
        if self.chunk_tokens > MAX_SEQ_LEN:
            raise ValueError(f"--chunk-tokens must be at most the model's {MAX_SEQ_LEN}, got "
                             f"{self.chunk_tokens}")
        overlap = self.chunk_overlap
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"--chunk-overlap must be a whole number >= 0, got {overlap!r}")
        if self.long_text != "chunk":
            chunk_options = [name for name, default in (
                ("chunk_tokens", MAX_SEQ_LEN), ("chunk_overlap", DEFAULT_OVERLAP),
                ("max_chunks", DEFAULT_MAX_CHUNKS), ("keep_chunk_text", False),
                ("doc_vectors", False)) if getattr(self, name) != default]
            if chunk_options:
                flags = ", ".join("--" + name.replace("_", "-") for name in chunk_options)
                verb = "applies" if len(chunk_options) == 1 else "apply"
                raise ValueError(f"{flags} {verb} to --long-text chunk only (--long-text is "
                                 f"{self.long_text})")
        else:
            clash = sorted({self.id_column, *self.keep_columns} & set(CHUNK_COLUMNS))
            if clash:
                raise ValueError(f"columns {clash} clash with the chunk columns --long-text chunk "
                                 f"writes ({', '.join(CHUNK_COLUMNS)}); rename them")

    @property
    def long_text_spec(self) -> LongText:
        """The long-text settings as one value (stages, writer and identity take it)."""
        return LongText(self.long_text, self.chunk_tokens, self.chunk_overlap, self.max_chunks,
                        self.keep_chunk_text, self.doc_vectors)

    def _check_columns(self) -> None:
        names = [self.id_column, self.text_column, *self.keep_columns]
        for name in names:
            if not name or name.startswith(RESERVED_PREFIX):
                raise ValueError(f"column name {name!r} is empty or uses the reserved prefix "
                                 f"{RESERVED_PREFIX!r}")
        if self.id_column in self.keep_columns:
            raise ValueError(f"keep_columns lists the id column {self.id_column!r}; the id is "
                             "always written")
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise ValueError(f"keep_columns {list(self.keep_columns)} repeat a column")
        clash = set(self.keep_columns) & {embedding_column(d) for d in self.dims}
        if clash:
            raise ValueError(f"keep_columns {sorted(clash)} clash with the embedding columns")

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for S3 URIs: the endpoint when one is given, else nothing."""
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def resolve_device_type(device: str, gpus: float, where: str = "the Ray cluster") -> str:
    """``cuda`` or ``cpu`` for ``--device`` (``auto``: CUDA when ``where`` has a GPU). The one
    rule: the plan applies it to the cluster, :class:`~pipeline.Embedder` to its process."""
    if device == "cuda" and gpus < 1:
        raise ValueError(f"--device cuda, but {where} has no GPUs; use --device cpu or "
                         "a cluster with GPU nodes")
    if device == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    return device


def resolve_dtype_name(dtype: str, device_type: str) -> str:
    """``--dtype`` resolved: ``auto`` is bfloat16 on GPUs and float32 on CPUs."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


# The key of the pooled vectors (before any cut or normalisation) among an encoder's results
# by width (``Embedder.embed_tokenized(..., pooled=True)``); no width is 0.
POOLED = 0


def embedding_column(width: int) -> str:
    """The output column of one Matryoshka width."""
    return f"embedding_{width}"


def _dims(dims: Any) -> tuple[int, ...]:
    if isinstance(dims, str):
        dims = parse_int_list(dims, "dims")
    dims = tuple(dims)
    if not dims:
        raise ValueError("dims must name at least one width")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"width {d!r} is not a positive integer")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims {list(dims)} repeat a width")
    return dims


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """``"768,512"`` -> ``(768, 512)``, with an error naming the option on bad items."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from None


def parse_name_list(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
