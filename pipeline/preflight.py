"""Checks that run before any heavy work: inputs, columns, output, model. No Ray.

Each failure is a clear error naming the URI, column or setting at fault, raised within
seconds, so that a misconfigured nightly job fails at start and not an hour in.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow as pa

from .chunking import Chunker
from .config import RunConfig
from .io.errors import InputError
from .io.readers import JSON_TEXT
from .io.sampling import (json_id_type, json_value_type, preferred_record, sample_columns,
                          sample_records)
from .io.storage import (InputFile, check_disjoint, list_inputs, prepare_output,
                         refuse_nightly_root, split_large_parquet)
from .model.config import check_dims, check_split, load_config
from .plan import ModelInfo
from .tokenize import TextTokenizer, TokenizerError, task_prefix

log = logging.getLogger("pipeline.preflight")

# Shards to look at for a first row before giving up on checking the columns up front.
MAX_SAMPLED_FILES = 20
SAMPLED_RECORDS = 100  # of each JSONL file sampled


@dataclasses.dataclass(frozen=True)
class Inputs:
    files: list[InputFile]
    id_type: pa.DataType | None  # the run's id type, from the first non-empty shard
    keep_types: tuple[tuple[str, object], ...] = ()  # the kept columns' types, likewise


def check_inputs(config: RunConfig, listed: list[InputFile] | None = None) -> Inputs:
    """List the input shards (or take the ``listed`` ones), check the id, text and kept
    columns on the first shard with rows, and settle the id and kept-column types (from the
    first shards that have values)."""
    if listed is None:
        files = list_inputs(config.input, config.storage_options, config.format)
        check_disjoint(config.input, config.output)
    else:
        files = list(listed)
    files = split_large_parquet(files, config.storage_options, config.unit_bytes)
    fmt = files[0].format if files else "parquet"
    id_type, keep_types, checked, sampled = None, {}, False, set()
    keys: set[str] = set()  # of the JSON records sampled
    for file in files:
        if len(sampled) >= MAX_SAMPLED_FILES or (
                checked and id_type is not None and len(keep_types) == len(config.keep_columns)):
            break
        if not file.size or file.uri in sampled:  # empty, or another slice of a sampled file
            continue
        sampled.add(file.uri)
        records = []
        if file.format == "parquet":
            columns = sample_columns(file, config.storage_options)
        else:
            records = sample_records(file, config.storage_options, SAMPLED_RECORDS)
            keys.update(k for r in records if isinstance(r, dict) for k in r)
            columns = preferred_record(records, config.id_column)
        if columns is None:
            continue  # no rows to look at
        if not checked:
            _check_columns(config, file, columns)
            checked = True
        if file.format == "parquet":
            found = {config.id_column: columns.get(config.id_column)}
            found |= {c: columns.get(c) for c in config.keep_columns}
            for name, kind in found.items():
                if kind is None or pa.types.is_null(kind):
                    continue  # absent, or all-null in this shard: not settled by it
                if name == config.id_column and id_type is None:
                    id_type = _check_id_type(kind, file.uri, config.id_column)
                elif name != config.id_column:
                    keep_types.setdefault(name, kind)
            continue
        if id_type is None and columns.get(config.id_column) is not None:
            id_type = json_id_type(columns[config.id_column], file.uri, config.id_column)
        for c in config.keep_columns:
            values = [r.get(c) for r in records]
            if c not in keep_types and any(v is not None for v in values):
                keep_types[c] = json_value_type(values)
    absent = [c for c in config.keep_columns if c not in keys]
    if fmt == "jsonl" and keys and absent:  # JSON records may leave a key out: not an error
        log.warning("kept column(s) %s: no key of that name in the first %d records of the %d "
                    "JSONL file(s) sampled (keys seen: %s); they are null where a record "
                    "lacks them: check --keep-columns", ", ".join(map(repr, absent)),
                    SAMPLED_RECORDS, len(sampled), ", ".join(sorted(keys)))
    # Never seen with a value: JSONL keeps such columns as text; Parquet as strings.
    unseen = JSON_TEXT if fmt == "jsonl" else pa.string()
    keep = tuple((c, keep_types.get(c, unseen)) for c in config.keep_columns)
    if id_type is None and fmt == "jsonl":
        id_type = pa.string()  # no id in the sample: such rows are rejected anyway
    return Inputs(files, id_type, keep)


def _check_columns(config: RunConfig, file: InputFile, columns: dict) -> None:
    required = [config.id_column, config.text_column]
    if file.format == "parquet":
        required += list(config.keep_columns)
    for name in required:
        if name not in columns:
            option = {config.id_column: "--id-column",
                      config.text_column: "--text-column"}.get(name, "--keep-columns")
            raise InputError(f"{file.uri} has no column {name!r} (columns: "
                             f"{', '.join(columns)}); set {option}")


def _check_id_type(kind: pa.DataType, uri: str, column: str) -> pa.DataType:
    """Ids must be integers, strings or bytes: values that compare exactly and hash."""
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    t = pa.types
    if t.is_integer(value) or t.is_string(value) or t.is_large_string(value) \
            or t.is_string_view(value) or t.is_binary(value) or t.is_large_binary(value) \
            or t.is_fixed_size_binary(value):
        return kind
    raise InputError(f"{uri}: id column {column!r} has type {kind}; ids must be integers, "
                     "strings or binary (choose another --id-column)")


def check_output(config: RunConfig) -> list[str]:
    """Check that the output is writable and is not a nightly job's root; returns the
    pipeline's files already there."""
    refuse_nightly_root(config.output, config.storage_options)
    return prepare_output(config.output, config.storage_options)


def load_model_info(config: RunConfig) -> ModelInfo:
    """Resolve the model once on the driver: config, tokenizer and weights fingerprint."""
    # Lazy: model.sources imports torch (through the checkpoint reader); the CLI's pre-flight
    # of a bad option should not pay for it.
    from .model.sources import resolve_model, weights_fingerprint

    resolved = resolve_model(config.model, revision=config.revision,
                             storage_options=config.storage_options,
                             gguf_expert_bias=config.gguf_expert_bias)
    model_config = load_config(resolved.local_dir)
    check_dims(config.dims, model_config.hidden_size)
    check_split(model_config.num_experts, config.expert_parallel)
    path = Path(resolved.local_dir) / "tokenizer.json"
    tokenizer_json = path.read_text(encoding="utf-8") if path.is_file() else ""
    tokenizer = TextTokenizer.from_json(tokenizer_json) if tokenizer_json else None
    if tokenizer is None or tokenizer.vocab_size > model_config.vocab_size:
        raise TokenizerError(f"model {resolved.model_id} has no usable tokenizer.json")
    if config.long_text == "chunk":  # the window against this tokenizer's prefix, now
        Chunker(tokenizer, task_prefix(config.task), config.chunk_tokens, config.chunk_overlap)
    # Actors resolve the same source; a hub source is pinned to the commit resolved here.
    source = str(resolved.local_dir) if resolved.kind == "local" else config.model
    return ModelInfo(
        source=source, model_id=resolved.model_id, revision=resolved.revision,
        fingerprint=weights_fingerprint(resolved.local_dir),
        hidden_size=model_config.hidden_size, tokenizer_json=tokenizer_json,
        num_experts=model_config.num_experts, gguf=resolved.gguf,
    )
