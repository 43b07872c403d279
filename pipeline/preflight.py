"""Checks that run before any heavy work: inputs, columns, output, model. No Ray.

Each failure is a clear error naming the URI, column or setting at fault, raised within
seconds, so that a misconfigured nightly job fails at start and not an hour in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa

from .config import RunConfig
from .io.storage import (InputError, InputFile, check_disjoint, json_id_type, json_value_type,
                         list_inputs, prepare_output, sample_columns, sample_records,
                         split_large_parquet)
from .plan import ModelInfo

# Shards to look at for a first row before giving up on checking the columns up front.
MAX_SAMPLED_FILES = 20


@dataclasses.dataclass(frozen=True)
class Inputs:
    files: list[InputFile]
    id_type: pa.DataType | None  # the run's id type, from the first non-empty shard
    keep_types: tuple[tuple[str, object], ...] = ()  # the kept columns' types, likewise


def check_inputs(config: RunConfig) -> Inputs:
    """List the input shards and check the id, text and kept columns on the first non-empty one."""
    files = list_inputs(config.input, config.storage_options, config.format)
    check_disjoint(config.input, config.output)
    files = split_large_parquet(files, config.storage_options, config.unit_bytes)
    for file in files[:MAX_SAMPLED_FILES]:
        columns = sample_columns(file, config.storage_options, prefer_key=config.id_column)
        if columns is None:
            continue
        required = [config.id_column, config.text_column]
        if file.format == "parquet":
            required += list(config.keep_columns)
        for name in required:
            if name not in columns:
                option = {config.id_column: "--id-column",
                          config.text_column: "--text-column"}.get(name, "--keep-columns")
                raise InputError(f"{file.uri} has no column {name!r} (columns: "
                                 f"{', '.join(columns)}); set {option}")
        if file.format == "parquet":
            return Inputs(files, columns[config.id_column],
                          tuple((c, columns[c]) for c in config.keep_columns))
        id_type = pa.string()  # no id in the sample: such rows are rejected anyway
        if columns[config.id_column] is not None:
            id_type = json_id_type(columns[config.id_column], file.uri, config.id_column)
        records = sample_records(file, config.storage_options)
        keep_types = tuple((c, json_value_type([r.get(c) for r in records]))
                           for c in config.keep_columns)
        return Inputs(files, id_type, keep_types)
    # Every sampled shard is empty: nothing to check, the readers will judge the rest.
    if files and files[0].format == "jsonl":
        return Inputs(files, pa.string(), tuple((c, json_value_type([]))
                                                for c in config.keep_columns))
    return Inputs(files, None)


def check_output(config: RunConfig) -> list[str]:
    """Check that the output is writable; returns the pipeline's files already there."""
    return prepare_output(config.output, config.storage_options)


def load_model_info(config: RunConfig) -> ModelInfo:
    """Resolve the model once on the driver: config, tokenizer and weights fingerprint."""
    from .model.config import load_config
    from .model.pooling import check_dims
    from .model.sources import resolve_model, weights_fingerprint
    from .tokenize import TextTokenizer, TokenizerError

    resolved = resolve_model(config.model, revision=config.revision,
                             storage_options=config.storage_options)
    model_config = load_config(resolved.local_dir)
    check_dims(config.dims, model_config.hidden_size)
    path = Path(resolved.local_dir) / "tokenizer.json"
    tokenizer_json = path.read_text(encoding="utf-8") if path.is_file() else ""
    tokenizer = TextTokenizer.from_json(tokenizer_json) if tokenizer_json else None
    if tokenizer is None or tokenizer.vocab_size > model_config.vocab_size:
        raise TokenizerError(f"model {resolved.model_id} has no usable tokenizer.json")
    # Actors resolve the same source; a hub source is pinned to the commit resolved here.
    source = str(resolved.local_dir) if resolved.kind == "local" else config.model
    return ModelInfo(
        source=source, model_id=resolved.model_id, revision=resolved.revision,
        fingerprint=weights_fingerprint(resolved.local_dir),
        hidden_size=model_config.hidden_size, tokenizer_json=tokenizer_json,
    )
