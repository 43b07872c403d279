"""Data-lake enrichment: the source table comes back with ``embedding_<width>`` columns added.

    python -m pipeline enrich --input URI --output URI [run options]
    python -m pipeline enrich --input iceberg:ns.table --output iceberg:ns.table [--iceberg-...]

Every source row, column, type and value is kept, in the same files and the same order:

1. The texts are embedded by an ordinary run (``pipeline/jobs/run.py``: units, manifests,
   resume, rejects) into a staging output that holds, per row, its file's row number
   (``_row``) and its vectors. Ids need not be unique (rows are matched by position).
2. Each source file is then read whole and written again with the embedding columns appended
   (null for a row that could not be embedded; its reason is in the staging ``_rejects/``),
   one Ray task per file. Hive-style folders (``key=value/``) are kept, since each file keeps
   its path relative to the input.
3. Parquet targets: the enriched files go to the same relative paths under ``--output``, and
   ``<output>/_summary.json`` is written last. Iceberg targets: the enriched files are
   committed to the table as ONE new snapshot (schema evolved with the new columns, every
   data file replaced; ``pipeline/io/iceberg.py``), so readers see the old table or the new.

The staging output is deleted once the enriched files are complete (or committed).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import units
from ..cluster.session import ray_session
from ..cluster.tasks import map_tasks
from ..config import RunConfig, embedding_column
from ..errors import RunFailed, root_cause
from ..io import schema as S
from ..io.errors import InputError
from ..io.writers import encodings
from ..io.storage import (DOCUMENTS_DIR, OUTPUT_PART_GLOB, InputFile, check_disjoint, glob_base,
                          is_iceberg, is_local, is_side_file, list_inputs, open_filesystem,
                          open_for_publish, own_files, publish_json, refuse_nightly_root,
                          relative, storage_errors, to_uri)
from .run import JobSpec, run

log = logging.getLogger("pipeline.enrich")

STAGING = "_staging"
CHUNKS = "_chunks"  # --long-text chunk: the chunk table beside the enriched table
ROW_COLUMN = "_row"  # the staging files' row number of each vector in its source file
SLICE_MARK = "#row-groups["
HIVE_SEGMENT = re.compile(r"^[^=/]+=[^/]*$")  # a hive-style partition folder: key=value


def staging_spec(files: list[InputFile] | None = None) -> JobSpec:
    """The staging run: vectors and row numbers only (no kept columns); ``files``: the input
    files when the job lists them itself (an Iceberg snapshot's)."""
    return JobSpec(
        identity={"enrich": True},
        output=lambda spec: dataclasses.replace(spec, keep_columns=(),
                                                extra_columns=((ROW_COLUMN, S.ROW),)),
        input_files=None if files is None else tuple(files), group_files=False,
    )


def staging_config(config: RunConfig, output: str) -> RunConfig:
    """The staging run's config; with ``--long-text chunk`` it writes document vectors (the
    ones appended) beside the chunk rows (moved to ``_chunks/`` at the end)."""
    return dataclasses.replace(config, output=output, keep_columns=(), on_duplicate="keep-all",
                               doc_vectors=config.long_text == "chunk")


def run_enrich(config: RunConfig) -> dict[str, Any]:
    """Enrich a Parquet table (folder, prefix or glob) or an Iceberg table; returns the summary."""
    if is_iceberg(config.input) or is_iceberg(config.output):
        return enrich_iceberg(config)
    return enrich_parquet(config)


def enrich_parquet(config: RunConfig) -> dict[str, Any]:
    files = list_inputs(config.input, config.storage_options, config.format)
    if files and files[0].format != "parquet":
        raise InputError(f"enrich reads Parquet tables (or Iceberg ones); {config.input} holds "
                         f"{files[0].format} files: use `run`, which writes ids and vectors")
    check_disjoint(config.input, config.output)
    refuse_nightly_root(config.output, config.storage_options)
    check_columns(files, config)
    out = config.output.rstrip("/")
    base = _input_base(config.input, files, config.storage_options)
    names = {f.uri: _relative_name(f.uri, base, config.storage_options) for f in files}
    targets = {uri: f"{out}/{name}" for uri, name in names.items()}
    with ray_session(config):  # one Ray for the staging run and the file rewrites
        result = run(staging_config(config, f"{out}/{STAGING}"), staging_spec())
        if not result["reconciled"]:
            return result
        earlier = _earlier_files(config, out)
        # Readers wait for the summary: it goes while the files are being replaced.
        fs, path = open_filesystem(f"{out}/_summary.json", config.storage_options)
        with storage_errors(out, "replace the summary at"):
            if fs.exists(path):
                fs.rm(path)
        merged = merge_all(config, f"{out}/{STAGING}", targets)
    # An earlier enrichment's files that this input covers but whose source is gone are not
    # part of the table now; those of sources this input does not cover stay (and listed).
    in_scope = _scope(config.input, base, files, config.storage_options)
    stale = sorted(n for n in set(earlier) - set(names.values()) if in_scope(n))
    result = _summary(result, merged) | {
        "enriched_names": sorted((set(earlier) - set(stale)) | set(names.values()))}
    if stale:
        fs, path = open_filesystem(out, config.storage_options)
        with storage_errors(out, "delete earlier enriched files at"):
            fs.rm([f"{path.rstrip('/')}/{name}" for name in stale])
        log.info("deleted %d enriched file(s) of an earlier run whose source is gone", len(stale))
    result["rejects_files"] = _move_rejects(config, f"{out}/{STAGING}", f"{out}/_rejects")
    if config.long_text == "chunk":
        result["chunks_files"] = _move_chunks(config, f"{out}/{STAGING}", f"{out}/{CHUNKS}")
    _write_json(config, f"{out}/_summary.json", result)
    _remove_staging(config, f"{out}/{STAGING}")
    return result


def check_columns(files: list[InputFile], config: RunConfig) -> None:
    """Every file has the id and text columns (footers read in parallel): a table file
    lacking them would come back with no vectors at all, so it is a setup mistake here."""
    def lacking(file: InputFile) -> list[str]:
        if not file.size:
            return []
        fs, path = open_filesystem(file.uri, config.storage_options)
        with storage_errors(file.uri, "read"), fs.open(path, "rb") as f:
            names = set(pq.ParquetFile(f).schema_arrow.names)
        return [c for c in (config.id_column, config.text_column) if c not in names]

    with ThreadPoolExecutor(16) as pool:
        missing = [(f.uri, cols) for f, cols in zip(files, pool.map(lacking, files)) if cols]
    if missing:
        uri, cols = missing[0]
        raise InputError(f"{len(missing)} file(s) of the table lack columns it needs, e.g. {uri} "
                         f"has no {cols} (--id-column {config.id_column}, --text-column "
                         f"{config.text_column})")


def enrich_iceberg(config: RunConfig) -> dict[str, Any]:
    # Lazy: pyiceberg is heavy, and only Iceberg targets need it.
    from ..io import iceberg

    if config.input != config.output:
        raise ValueError(f"an Iceberg table is enriched in place, as a new snapshot: give the "
                         f"same table as --input and --output (got {config.input} and "
                         f"{config.output})")
    table = iceberg.load_table(open_catalog(config), config.input)
    infos = iceberg.source_files(table)
    if not infos:
        raise InputError(f"Iceberg table {config.input} has no data files to enrich")
    snapshot = table.current_snapshot().snapshot_id
    files = [InputFile(i.uri, i.size, "parquet", None) for i in infos]
    staging = f"{table.location().rstrip('/')}/_enrich/{snapshot}"
    enriched = iceberg.staging_location(table, str(snapshot))
    targets = {i.uri: iceberg.enriched_file_uri(enriched, k, i.uri) for k, i in enumerate(infos)}
    with ray_session(config):  # one Ray for the staging run and the file rewrites
        result = run(staging_config(config, staging), staging_spec(files))
        if not result["reconciled"]:
            return result
        merged = merge_all(config, staging, targets,
                           frozenset(f.field_id for f in table.schema().fields))
    result = _summary(result, merged)
    snapshot_id = iceberg.commit_enriched(
        table, targets, config.dims, properties={
            "pipeline.model": result["model"]["model_id"],
            "pipeline.weights-fingerprint": result["model"]["weights_fingerprint"],
            "pipeline.task": config.task, "pipeline.rows-embedded": result["rows_embedded"],
            "pipeline.rows-rejected": result["rows_rejected"],
        })
    result |= {"iceberg": {"table": config.input, "source_snapshot_id": snapshot,
                           "snapshot_id": snapshot_id}}
    result["rejects_files"] = _move_rejects(config, staging, f"{staging}-rejects")
    if config.long_text == "chunk":
        result["chunks_files"] = _move_chunks(config, staging, f"{staging}-chunks")
    _write_json(config, f"{staging}-summary.json", result)
    _remove_staging(config, staging)
    return result


def open_catalog(config: RunConfig):
    """The Iceberg catalog the ``--iceberg-*`` options name (see ``io/iceberg.load_catalog``)."""
    from ..io import iceberg  # lazy: pyiceberg, for Iceberg targets only

    return iceberg.load_catalog(config.iceberg_catalog, config.iceberg_catalog_uri,
                                config.iceberg_warehouse, config.storage_options)


def merge_all(config: RunConfig, staging: str, targets: dict[str, str],
              field_ids: frozenset[int] | None = None) -> list[dict[str, Any]]:
    """Write every enriched file (one Ray task per source file); returns their records."""
    fs, path = open_filesystem(staging, config.storage_options)
    state = units.load_state(fs, path, own_files(fs, path))
    parts: dict[str, list[str]] = {uri: [] for uri in targets}
    # The vectors appended: the rows' own, or with --long-text chunk the documents'.
    if config.long_text == "chunk":
        wanted = lambda f: f.startswith(DOCUMENTS_DIR + "/")  # noqa: E731
    else:
        wanted = lambda f: not is_side_file(f)  # noqa: E731
    for unit in state.units.values():
        source = unit["uri"].split(SLICE_MARK, 1)[0]
        parts.setdefault(source, []).extend(
            f"{staging.rstrip('/')}/{f}" for f in unit["files"] if wanted(f))
    unknown = sorted(set(parts) - set(targets))
    if unknown:
        raise RunFailed(f"the staging output {staging} holds units of files not in the input: "
                        f"{unknown[:3]}")
    metadata = _pipeline_metadata(parts, config.storage_options)
    calls = [(source, parts[source], target, tuple(config.dims), config.output_dtype,
              metadata, config.storage_options, field_ids)
             for source, target in sorted(targets.items())]
    try:
        return map_tasks(merge_file, calls, num_cpus=1, max_retries=3)
    except Exception as err:  # noqa: BLE001 - reported with the stage's own error
        cause = root_cause(err)
        raise RunFailed(f"writing the enriched files failed: {type(cause).__name__}: {cause}") from err


def merge_file(source: str, parts: list[str], target: str, dims: tuple[int, ...],
               output_dtype: str, metadata: dict[str, Any] | None,
               storage_options: dict[str, Any],
               field_ids: frozenset[int] | None = None) -> dict[str, Any]:
    """Write ``source``'s table with its vectors (from the staging ``parts``) appended.

    Columns keep their Parquet storage (decimals stored as integers stay so). ``field_ids``
    (Iceberg: the table schema's top-level field ids) drops a column whose field id the table
    no longer has (a dropped column that old data files still hold).
    """
    fs, path = open_filesystem(source, storage_options)
    with storage_errors(source, "read"), fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        table = pf.read()
        decimals_as_integers = any(
            pf.schema.column(i).logical_type.type == "DECIMAL"
            and pf.schema.column(i).physical_type in ("INT32", "INT64")
            for i in range(len(pf.schema)))
    if field_ids is not None:
        table = table.drop_columns([f.name for f in table.schema
                                    if _field_id(f) is not None and _field_id(f) not in field_ids])
    n = table.num_rows
    values, have = _staged_vectors(source, n, parts, dims, output_dtype, storage_options)
    out = table.drop_columns([c for c in (embedding_column(d) for d in dims)
                              if c in table.column_names])
    for d in dims:
        column = pa.FixedSizeListArray.from_arrays(pa.array(values[d].reshape(-1)), d,
                                                   mask=pa.array(~have))
        out = out.append_column(embedding_column(d), column.cast(S.embedding_type(d, output_dtype)))
    schema_metadata = dict(table.schema.metadata or {})
    if metadata:
        schema_metadata |= S.encode_metadata(metadata)
    out = out.replace_schema_metadata(schema_metadata)
    tfs, tpath = open_filesystem(target, storage_options)
    with storage_errors(target, "write"):
        if is_local(tfs):
            tfs.makedirs(posixpath.dirname(tpath), exist_ok=True)
        with open_for_publish(tfs, tpath) as f:
            pq.write_table(out, f, store_decimal_as_integer=decimals_as_integers,
                           **encodings(out.schema))
    return {"source": source, "target": target, "rows": n, "rows_with_embeddings": int(have.sum())}


def _staged_vectors(source: str, n: int, parts: list[str], dims: tuple[int, ...],
                    output_dtype: str, storage_options: dict[str, Any]):
    """The vectors of ``source``'s ``n`` rows from its staging ``parts``, by row number, and
    which rows have one (a rejected row has none); every row at most once."""
    dtype = np.float16 if output_dtype == "float16" else np.float32
    values = {d: np.zeros((n, d), dtype) for d in dims}
    have = np.zeros(n, bool)
    for part in parts:
        pfs, ppath = open_filesystem(part, storage_options)
        with storage_errors(part, "read"), pfs.open(ppath, "rb") as f:
            vectors = pq.read_table(f, columns=[ROW_COLUMN] + [embedding_column(d) for d in dims])
        rows = vectors[ROW_COLUMN].to_numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= n or have[rows].any()
                          or len(np.unique(rows)) != len(rows)):
            raise ValueError(f"{part}: row numbers out of range or repeated for {source} "
                             f"({n} rows); the staging output does not match the source")
        have[rows] = True
        for d in dims:
            flat = vectors[embedding_column(d)].combine_chunks().flatten().to_numpy(
                zero_copy_only=False)
            values[d][rows] = flat.reshape(len(rows), d)
    return values, have


def _field_id(field: pa.Field) -> int | None:
    value = (field.metadata or {}).get(b"PARQUET:field_id")
    return int(value) if value is not None else None


def _pipeline_metadata(parts: dict[str, list[str]], storage_options) -> dict[str, Any] | None:
    """The run metadata (model, fingerprint, widths...) from one staging file's schema."""
    for files in parts.values():
        for part in files:
            fs, path = open_filesystem(part, storage_options)
            with storage_errors(part, "read"), fs.open(path, "rb") as f:
                return S.read_metadata(pq.ParquetFile(f).schema_arrow)
    return None


def _input_base(uri: str, files: list[InputFile], storage_options) -> str:
    """The folder the input's files are named relative to: a glob's fixed part, a single
    file's folder, else the prefix itself; then above any ``key=value`` (hive partition)
    folders at its end, so that every partition folder is kept in the output's paths."""
    base = uri.rstrip("/")
    if any(ch in uri for ch in "*?["):
        base = glob_base(uri).rstrip("/")
    elif len(files) == 1:
        fs, path = open_filesystem(uri, storage_options)
        if fs.isfile(path):
            base = base.rsplit("/", 1)[0] if "/" in base else "."
    while HIVE_SEGMENT.match(base.rsplit("/", 1)[-1]):
        base = base.rsplit("/", 1)[0] if "/" in base else "."
    return base


def _scope(uri: str, base: str, files: list[InputFile], storage_options):
    """Whether an output name (relative to the output) is among what input ``uri`` covers:
    its glob, its one file, or everything under its prefix."""
    rest = uri.rstrip("/") if base == "." else uri.rstrip("/")[len(base):].strip("/")
    if any(ch in uri for ch in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, rest)
    if len(files) == 1 and rest and files[0].uri.rstrip("/").endswith(rest):
        fs, path = open_filesystem(uri, storage_options)
        if fs.isfile(path):
            return lambda name: name == rest
    return lambda name: not rest or name == rest or name.startswith(rest + "/")


def _relative_name(file_uri: str, base_uri: str, storage_options) -> str:
    fs, path = open_filesystem(file_uri, storage_options)
    _, base = open_filesystem(base_uri, storage_options)
    return relative(path, base, is_local(fs))


def _earlier_files(config: RunConfig, out: str) -> list[str]:
    """The enriched files (names relative to ``out``) an earlier run listed in its summary."""
    fs, path = open_filesystem(f"{out}/_summary.json", config.storage_options)
    with storage_errors(out, "read the earlier summary at"):
        if not fs.exists(path):
            return []
        names = json.loads(fs.cat_file(path)).get("enriched_names", [])
    return [n for n in names if isinstance(n, str) and not n.startswith(("/", "..", "_"))
            and ".." not in n.split("/")]


def _summary(result: dict[str, Any], merged: list[dict[str, Any]]) -> dict[str, Any]:
    # The staging run's files are gone once merged (or moved to _chunks/): the output's
    # files are the enriched ones.
    # (the staging run's file counts and lists went with it).
    result = {k: v for k, v in result.items() if k not in ("documents_files", "files")}
    return result | {
        "output_files": [m["target"] for m in merged],
        "rows_out": sum(m["rows"] for m in merged),
        "rows_with_embeddings": sum(m["rows_with_embeddings"] for m in merged),
        "enriched_files": [m["target"] for m in merged],
    }


def _write_json(config: RunConfig, uri: str, document: dict[str, Any]) -> None:
    fs, path = open_filesystem(uri, config.storage_options)
    publish_json(fs, path, document)


def _move_rejects(config: RunConfig, staging: str, dest: str) -> list[str]:
    """Move the staging output's rejects (rows left without vectors, with their reasons) to
    ``dest``, replacing what an earlier run left there; returns their new URIs."""
    fs, path = open_filesystem(staging, config.storage_options)
    _, target = open_filesystem(dest, config.storage_options)
    with storage_errors(dest, "move the rejects to"):
        if fs.exists(target):
            fs.rm(target, recursive=True)
        found = fs.find(f"{path.rstrip('/')}/_rejects") if fs.exists(f"{path.rstrip('/')}/_rejects") else []
        return _move_into(fs, found, target, dest)


def _move_into(fs, found: list[str], target: str, dest: str) -> list[str]:
    """Move the files ``found`` into the folder ``target`` (``dest`` as a URI); their URIs."""
    moved = []
    for p in sorted(found):
        name = posixpath.basename(p)
        if is_local(fs):
            fs.makedirs(target, exist_ok=True)
        fs.mv(p, f"{target}/{name}")
        moved.append(f"{dest.rstrip('/')}/{name}")
    return moved


def _move_chunks(config: RunConfig, staging: str, dest: str) -> list[str]:
    """Move the staging chunk table (one row per chunk: id, ``_row``, spans, vectors) to
    ``dest``, replacing what an earlier run left there; returns the new URIs."""
    fs, path = open_filesystem(staging, config.storage_options)
    _, target = open_filesystem(dest, config.storage_options)
    base = path.rstrip("/")
    with storage_errors(dest, "move the chunk table to"):
        found = [p for p in fs.ls(base, detail=False)
                 if fnmatch.fnmatch(posixpath.basename(p), OUTPUT_PART_GLOB)]
        # Files are named part-<unit key>-<id>.parquet: an earlier run's chunks of the units
        # enriched now are replaced; those of sources this input does not cover stay.
        redone = {posixpath.basename(p).split("-")[1] for p in found}
        if fs.exists(target):
            old = [p for p in fs.ls(target, detail=False)
                   if set(posixpath.basename(p).split("-")[1:2]) & redone]
            if old:
                fs.rm(old)
        return _move_into(fs, found, target, dest)


def _remove_staging(config: RunConfig, staging: str) -> None:
    fs, path = open_filesystem(staging, config.storage_options)
    with storage_errors(to_uri(fs, path), "delete the staging output"):
        if fs.exists(path):
            fs.rm(path, recursive=True)
