"""Apache Iceberg tables as the source and target of an enrichment run. No Ray here.

The enrichment job reads a table's current data files, writes one enriched Parquet file per
source file (the same rows in the same order, every column kept, ``embedding_<width>``
columns added) under :func:`staging_location`, and commits them with
:func:`commit_enriched` as ONE new snapshot: a reader sees the old table or the new one,
never a mix, and time travel to the old snapshot still reads the old files.

The commit never reads row data: the new files' partition values are copied from the files
they replace (an enriched file holds exactly one source file's rows), and their column
statistics come from the Parquet footers, as pyiceberg's own ``add_files`` computes them.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog
from pyiceberg.catalog import load_catalog as _pyiceberg_load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NoSuchNamespaceError,
    NoSuchTableError,
    ValidationException,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestContent
from pyiceberg.table import Table, TableProperties, Transaction
from pyiceberg.table import snapshots as _snapshots
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.types import (
    DateType,
    FloatType,
    IcebergType,
    ListType,
    TimestampType,
    TimestamptzType,
    TimeType,
)
from pyiceberg.utils.config import Config
from pyiceberg.utils.datetime import (
    days_to_date,
    micros_to_time,
    micros_to_timestamp,
    micros_to_timestamptz,
)

from ..errors import UserError
from .storage import ICEBERG_SCHEME, is_iceberg

EMBEDDING_PREFIX = "embedding_"
CATALOG_DB_NAME = "catalog.db"
FSSPEC_FILE_IO = "pyiceberg.io.fsspec.FsspecFileIO"
# Footer reads are one small ranged GET each; enough threads to hide S3 latency.
FOOTER_THREADS = 16
_IDENTIFIER_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
# Parquet (physical, logical) type of an embedding list's element: float32 or float16.
EMBEDDING_LEAVES = (("FLOAT", "None"), ("FIXED_LEN_BYTE_ARRAY", "Float16"))
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
# fsspec/s3fs storage option -> pyiceberg FileIO property.
_STORAGE_OPTION_PROPERTIES = {
    "endpoint_url": "s3.endpoint",
    "key": "s3.access-key-id",
    "secret": "s3.secret-access-key",
    "token": "s3.session-token",
    "region": "s3.region",
}
# Keys pyiceberg writes into every snapshot summary; a caller's property must not shadow them.
_RESERVED_SUMMARY_KEYS = frozenset(v for k, v in vars(_snapshots).items()
                                   if k.isupper() and isinstance(v, str))
PARTITION_SUMMARY_PREFIX = "partitions."
CATALOG_OPTIONS_HINT = ("--iceberg-catalog NAME (configured in ~/.pyiceberg.yaml or "
                        "PYICEBERG_CATALOG__<NAME>__URI), --iceberg-catalog-uri URI, or "
                        "--iceberg-warehouse URI")


class Footer(NamedTuple):
    """A Parquet file's footer and its size in bytes."""

    meta: pq.FileMetaData
    size: int


class IcebergError(UserError, RuntimeError):
    """A catalog cannot be reached, a table is missing, or a table cannot be enriched."""


@dataclasses.dataclass(frozen=True)
class DataFileInfo:
    """One data file of a table's current snapshot."""

    uri: str  # as the table records it: s3://..., file:///... or an absolute local path
    size: int  # bytes
    records: int
    partition: dict[str, Any]  # partition field name -> Python value; {} if unpartitioned


# ---------------------------------------------------------------------------------------------
# Identifiers and catalogs

def parse_table(uri: str) -> tuple[str, ...]:
    """``iceberg:ns.table`` (or ``iceberg://ns.table``, nested ``a.b.table``) -> identifier."""
    if not is_iceberg(uri):
        raise ValueError(f"not an Iceberg table: {uri!r}; expected iceberg:<namespace>.<table>")
    name = uri[len(ICEBERG_SCHEME):].removeprefix("//")
    parts = tuple(name.split("."))
    if len(parts) < 2 or not all(_IDENTIFIER_PART.match(p) for p in parts):
        raise ValueError(f"bad Iceberg table {uri!r}: expected iceberg:<namespace>.<table> with "
                         "names of letters, digits, '_' or '-' (e.g. iceberg:lake.docs)")
    return parts


def _identifier(table: str | Sequence[str]) -> tuple[str, ...]:
    """``iceberg:ns.t``, ``ns.t`` or ``("ns", "t")`` -> ``("ns", "t")``."""
    if isinstance(table, str):
        return parse_table(table if is_iceberg(table) else ICEBERG_SCHEME + table)
    return tuple(table)


def load_catalog(name: str = "default", uri: str | None = None, warehouse: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> Catalog:
    """Open catalog ``name``: as pyiceberg's configuration defines it, or from ``uri``/``warehouse``.

    The configuration (``~/.pyiceberg.yaml``, ``PYICEBERG_CATALOG__<NAME>__*``) is read fresh on
    every call; ``uri`` and ``warehouse`` override it. ``uri`` picks the type: ``sqlite://`` or
    ``postgresql://`` a SQL catalog, ``http(s)://`` a REST catalog. With neither configuration
    nor ``uri``, a SQLite catalog at ``<warehouse>/catalog.db`` (local warehouses only).
    ``storage_options`` (fsspec names: endpoint_url, key, secret, token, region) become
    pyiceberg's ``s3.*`` properties; without them the standard AWS environment applies.
    """
    conf = dict(Config().get_catalog_config(name) or {})
    if warehouse:
        conf["warehouse"] = _warehouse_uri(warehouse)
    if uri:
        conf["uri"] = uri
    conf.update(_s3_properties(storage_options))
    # s3fs/botocore, as the rest of the pipeline uses: it honours the whole standard AWS
    # chain (AWS_ENDPOINT_URL, profiles, config files); pyiceberg's default PyArrow S3 client
    # ignores AWS_ENDPOINT_URL and looks the bucket's region up on AWS itself.
    conf.setdefault("py-io-impl", FSSPEC_FILE_IO)
    if "uri" not in conf and "type" not in conf and "py-catalog-impl" not in conf:
        conf["uri"] = _default_sqlite_uri(name, conf.get("warehouse"))
    if str(conf.get("uri", "")).startswith("sqlite:"):
        conf.setdefault("type", "sql")
    try:
        return _pyiceberg_load_catalog(name, **conf)
    except Exception as err:  # noqa: BLE001 - any driver/HTTP failure, reported in one line
        where = conf.get("uri") or conf.get("type")
        raise IcebergError(f"cannot open Iceberg catalog {name!r} ({where}): "
                           f"{type(err).__name__}: {_first_line(err)}") from err


def load_table(catalog: Catalog, table: str | Sequence[str]) -> Table:
    """The table ``table`` (``iceberg:ns.t``, ``ns.t`` or an identifier tuple) of ``catalog``."""
    identifier = _identifier(table)
    shown = ".".join(identifier)
    try:
        return catalog.load_table(identifier)
    except (NoSuchTableError, NoSuchNamespaceError) as err:
        raise IcebergError(f"Iceberg table {shown!r} does not exist in catalog "
                           f"{catalog.name!r}") from err
    except Exception as err:  # noqa: BLE001 - any driver/HTTP failure, reported in one line
        raise IcebergError(f"cannot load Iceberg table {shown!r} from catalog {catalog.name!r}: "
                           f"{type(err).__name__}: {_first_line(err)}") from err


def create_table_from(catalog: Catalog, identifier: str | Sequence[str], arrow_schema: pa.Schema,
                      partition_by: Sequence[str] | None = None,
                      location: str | None = None) -> Table:
    """Create a table with ``arrow_schema`` and identity partitions on ``partition_by`` columns.

    The namespace is created when missing.
    """
    ident = _identifier(identifier)
    catalog.create_namespace_if_not_exists(ident[:-1])
    with catalog.create_table_transaction(ident, schema=arrow_schema, location=location) as tx:
        if partition_by:
            with tx.update_spec() as spec:
                for column in partition_by:
                    spec.add_identity(column)
    return catalog.load_table(ident)


def _warehouse_uri(warehouse: str) -> str:
    """Remote warehouses as given; a local one as an absolute ``file://`` URI."""
    if "://" in warehouse and not warehouse.startswith("file://"):
        return warehouse.rstrip("/")
    return "file://" + os.path.abspath(warehouse.removeprefix("file://"))


def _default_sqlite_uri(name: str, warehouse: str | None) -> str:
    if not warehouse:
        raise ValueError(f"no Iceberg catalog {name!r} is configured and no catalog URI or "
                         f"warehouse was given; pass {CATALOG_OPTIONS_HINT}")
    if not warehouse.startswith("file://"):
        raise ValueError(f"the default SQLite catalog file cannot live in {warehouse}; pass "
                         "--iceberg-catalog-uri (e.g. sqlite:////path/catalog.db or "
                         "postgresql://...) or a configured --iceberg-catalog")
    root = warehouse.removeprefix("file://")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/{CATALOG_DB_NAME}"


def _s3_properties(storage_options: dict[str, Any] | None) -> dict[str, str]:
    options = dict(storage_options or {})
    region = (options.get("client_kwargs") or {}).get("region_name")
    if region:
        options.setdefault("region", region)
    return {prop: str(options[key]) for key, prop in _STORAGE_OPTION_PROPERTIES.items()
            if options.get(key)}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _table_name(table: Table) -> str:
    return ".".join(table.name())


# ---------------------------------------------------------------------------------------------
# Reading the current snapshot

def source_files(table: Table) -> list[DataFileInfo]:
    """The data files of ``table``'s current snapshot, sorted by URI; [] for an empty table.

    Partition values are Python values (a ``date`` for an identity partition on a date).
    Raises :class:`IcebergError` for tables that cannot be enriched file by file: row-level
    deletes (merge-on-read delete files or deletion vectors) or non-Parquet data files.
    """
    schema = table.schema()
    fields = {spec_id: [(f.name, f.transform.result_type(schema.find_type(f.source_id)))
                        for f in spec.fields]
              for spec_id, spec in table.specs().items()}
    return [DataFileInfo(uri=f.file_path, size=f.file_size_in_bytes, records=f.record_count,
                         partition={name: _python_value(kind, value)
                                    for (name, kind), value in zip(fields[f.spec_id], f.partition)})
            for f in _live_data_files(table)]


def _python_value(kind: IcebergType, value: Any) -> Any:
    """A partition value as Python holds it: Iceberg stores dates as days, times as micros."""
    if value is None:
        return None
    if isinstance(kind, DateType):
        return days_to_date(value)
    if isinstance(kind, TimestamptzType):
        return micros_to_timestamptz(value)
    if isinstance(kind, TimestampType):
        return micros_to_timestamp(value)
    if isinstance(kind, TimeType):
        return micros_to_time(value)
    return value


def _live_data_files(table: Table) -> list[DataFile]:
    snapshot = table.current_snapshot()
    if snapshot is None:
        return []
    manifests = snapshot.manifests(table.io)
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        entries = pool.map(lambda m: m.fetch_manifest_entry(table.io, discard_deleted=True),
                           manifests)
        files = [(m, e.data_file) for m, es in zip(manifests, entries) for e in es]
    name = _table_name(table)
    deletes = [f.file_path for m, f in files
               if m.content == ManifestContent.DELETES or f.content != DataFileContent.DATA]
    if deletes:
        raise IcebergError(
            f"Iceberg table {name!r} has {len(deletes)} delete file(s) (row-level deletes, e.g. "
            f"{deletes[0]}); enrichment needs plain data files: compact the table first "
            "(rewrite_data_files / a copy-on-write rewrite)")
    others = [f.file_path for _, f in files if f.file_format != FileFormat.PARQUET]
    if others:
        raise IcebergError(f"Iceberg table {name!r} has {len(others)} non-Parquet data file(s) "
                           f"(e.g. {others[0]}); only Parquet tables can be enriched")
    return sorted((f for _, f in files), key=lambda f: f.file_path)


# ---------------------------------------------------------------------------------------------
# Where enriched files go

def staging_location(table: Table, run_id: str) -> str:
    """The folder (ending in ``/``) for run ``run_id``'s enriched files: in the table's data path.

    Files written there belong to no snapshot until :func:`commit_enriched`; a failed run
    leaves orphans that Iceberg's orphan-file cleanup removes.
    """
    if not _RUN_ID.match(run_id):
        raise ValueError(f"bad run id {run_id!r}: use letters, digits, '_', '-' or '.'")
    data = table.properties.get(TableProperties.WRITE_DATA_PATH) or f"{table.location()}/data"
    return f"{data.rstrip('/')}/enriched-{run_id}/"


def enriched_file_uri(staging: str, index: int, source_uri: str) -> str:
    """A unique name under ``staging`` for the enriched copy of the ``index``-th source file."""
    stem = posixpath.splitext(posixpath.basename(source_uri))[0]
    return f"{staging.rstrip('/')}/{index:05d}-{stem}.parquet"


# ---------------------------------------------------------------------------------------------
# Committing

def embedding_columns(widths: Sequence[int]) -> list[str]:
    """``embedding_<width>`` per width, in order."""
    if not widths or any(int(w) <= 0 for w in widths) or len(set(widths)) != len(widths):
        raise ValueError(f"bad embedding widths {list(widths)}: give distinct positive ints")
    return [f"{EMBEDDING_PREFIX}{int(w)}" for w in widths]


def commit_enriched(table: Table, files: Mapping[str, str], widths: Sequence[int],
                    properties: Mapping[str, Any] | None = None) -> int | None:
    """Replace every data file of ``table`` with its enriched copy, as ONE snapshot.

    ``files`` maps each current data file's URI (``DataFileInfo.uri``) to its enriched file.
    Each enriched file must hold the same number of rows and every column of its source
    (same Parquet types), plus one ``embedding_<width>`` column per width: a list of float32
    or float16 (stored as Iceberg ``list<float>``), null where a row has no embedding.
    Missing embedding columns are added to the schema in the same transaction; existing
    ones must already be ``list<float>``. ``properties`` go into the snapshot summary.
    Keys of ``properties`` must not be Iceberg's own summary keys (``operation``,
    ``added-records``, ...); prefix them, e.g. ``pipeline.run-id``.
    Returns the new current snapshot id; for a table without data files (``files`` empty)
    only the schema changes and the current snapshot id, or None, is returned.
    Raises :class:`IcebergError` when the table changed since its files were listed, when a
    file does not match its source, or on a schema conflict; nothing is committed then.
    """
    names = embedding_columns(widths)
    summary = _summary_properties(properties)
    table = table.refresh()
    sources = _matched_sources(table, files)
    footers = _read_footers(table, [f.file_path for f in sources] + [files[f.file_path]
                                                                     for f in sources])
    for source in sources:
        _check_enriched(table, source, files[source.file_path], names, footers)
    tx = table.transaction()
    _add_embedding_columns(tx, names, _table_name(table))
    if tx.table_metadata.name_mapping() is None:
        # Enriched files may lack Parquet field ids (the embedding columns always do):
        # readers then resolve columns by name through this mapping.
        tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                             tx.table_metadata.schema().name_mapping.model_dump_json()})
    if sources:
        new_files = _data_files(tx.table_metadata, sources, files, footers)
        with tx.update_snapshot(snapshot_properties=summary).overwrite() as overwrite:
            # Declares the whole table replaced, so that on a retry after a concurrent commit
            # pyiceberg's conflict checks refuse any new data or delete file in the table
            # (a ValidationException) instead of committing a mix.
            overwrite.delete_by_predicate(AlwaysTrue())
            for source, new_file in zip(sources, new_files):
                overwrite.delete_data_file(source)
                overwrite.append_data_file(new_file)
    try:
        committed = tx.commit_transaction()
    except (CommitFailedException, ValidationException) as err:
        raise IcebergError(f"another writer committed to Iceberg table {_table_name(table)!r} "
                           f"during the enrichment commit, so nothing was committed; run again "
                           f"({type(err).__name__}: {_first_line(err)})") from err
    snapshot = committed.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


def _matched_sources(table: Table, files: Mapping[str, str]) -> list[DataFile]:
    """The current data files, checked to be exactly the keys of ``files``."""
    sources = _live_data_files(table)
    current = {f.file_path for f in sources}
    unlisted, unknown = current - set(files), set(files) - current
    if unlisted or unknown:
        example = sorted(unlisted or unknown)[0]
        raise IcebergError(
            f"Iceberg table {_table_name(table)!r} changed since its files were listed: "
            f"{len(unlisted)} current data file(s) have no enriched copy, {len(unknown)} "
            f"enriched source(s) are no longer in the table (e.g. {example}); run again")
    targets = list(files.values())
    if len(set(targets)) != len(targets) or set(targets) & current:
        raise IcebergError("enriched files must be new and distinct, one per source file")
    if {f.spec_id for f in sources} - {table.spec().spec_id}:
        raise IcebergError(f"Iceberg table {_table_name(table)!r} has data files of an older "
                           "partition spec; rewrite them to the current spec first")
    return sources


def _read_footers(table: Table, uris: list[str]) -> dict[str, Footer]:
    def read(uri: str) -> Footer:
        try:
            input_file = table.io.new_input(uri)
            with input_file.open() as stream:
                return Footer(pq.read_metadata(stream), len(input_file))
        except Exception as err:  # noqa: BLE001 - missing file, bad bytes or an S3 failure
            raise IcebergError(f"cannot read the Parquet footer of {uri}: "
                               f"{type(err).__name__}: {_first_line(err)}") from err

    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return dict(zip(uris, pool.map(read, uris)))


def _leaf_types(meta: pq.FileMetaData) -> dict[str, tuple[str, str]]:
    """Parquet leaf column path -> (physical type, logical type)."""
    return {col.path: (col.physical_type, str(col.logical_type)) for col in meta.schema}


def _check_enriched(table: Table, source: DataFile, uri: str, names: list[str],
                    footers: dict[str, Footer]) -> None:
    """The enriched file holds the source's rows and columns plus the embedding columns.

    Columns are compared as Parquet types (what Iceberg reads), so a writer's string vs
    large_string choice does not matter while an int32 -> int64 change does.
    """
    src, new = footers[source.file_path].meta, footers[uri].meta
    # A column whose field id the table no longer has (dropped since the file was written)
    # is not part of the table: the enriched file may leave it out.
    ids = {f.field_id for f in table.schema().fields}
    dropped = {f.name for f in src.schema.to_arrow_schema()
               if (f.metadata or {}).get(b"PARQUET:field_id") is not None
               and int(f.metadata[b"PARQUET:field_id"]) not in ids}
    src_top = [n for n in src.schema.to_arrow_schema().names if n not in names and n not in dropped]
    new_top = new.schema.to_arrow_schema().names
    src_leaves, new_leaves = _leaf_types(src), _leaf_types(new)
    changed = [p for p, t in src_leaves.items()
               if p.split(".")[0] not in names and p.split(".")[0] not in dropped
               and new_leaves.get(p) != t]
    not_float = [n for n in names if new_leaves.get(f"{n}.list.element") not in EMBEDDING_LEAVES]
    problem = None
    if new.num_rows != source.record_count:
        problem = f"{new.num_rows} rows, its source {source.record_count}"
    elif sorted(new_top) != sorted(src_top + names):
        problem = f"columns {new_top}, expected {src_top} + {names}"
    elif changed:
        problem = (f"column {changed[0]} is {new_leaves.get(changed[0])}, in the source "
                   f"{src_leaves[changed[0]]}")
    elif not_float:
        problem = (f"{not_float[0]} is not a list of float32 or float16 in Parquet's "
                   f"standard list layout ({not_float[0]}.list.element)")
    if problem:
        raise IcebergError(f"enriched file {uri} does not match its source "
                           f"{source.file_path} of table {_table_name(table)!r}: {problem}")


def _add_embedding_columns(tx: Transaction, names: list[str], table_name: str) -> None:
    schema = tx.table_metadata.schema()
    existing = {f.name: f for f in schema.fields}
    missing = [n for n in names if n not in existing]
    for name in names:
        field = existing.get(name)
        if field is not None and not (isinstance(field.field_type, ListType)
                                      and isinstance(field.field_type.element_type, FloatType)):
            raise IcebergError(f"Iceberg table {table_name!r} already has a column {name!r} of "
                               f"type {field.field_type}; an embedding column must be list<float>")
    if missing:
        with tx.update_schema() as update:
            for name in missing:
                width = name.removeprefix(EMBEDDING_PREFIX)
                # Iceberg has no fixed-size list: the width lives in the name and the doc.
                update.add_column(name, ListType(element_id=-1, element_type=FloatType(),
                                                 element_required=False),
                                  doc=f"embedding, {width} floats per row; null if not embedded")


def _data_files(metadata: TableMetadata, sources: list[DataFile], files: Mapping[str, str],
                footers: dict[str, Footer]) -> list[DataFile]:
    """The enriched files' entries: statistics from their footers (as pyiceberg's add_files
    computes them), partition and spec from the source file each one replaces."""
    schema = metadata.schema()
    plan = compute_statistics_plan(schema, metadata.properties)
    paths = parquet_path_to_id_mapping(schema)
    out = []
    for source in sources:
        uri = files[source.file_path]
        try:
            stats = data_file_statistics_from_parquet_metadata(footers[uri].meta, plan, paths)
        except KeyError as err:
            raise IcebergError(f"enriched file {uri} has Parquet column {err} that the table "
                               "schema does not name") from err
        out.append(DataFile.from_args(
            content=DataFileContent.DATA, file_path=uri, file_format=FileFormat.PARQUET,
            partition=source.partition, file_size_in_bytes=footers[uri].size,
            sort_order_id=None, spec_id=source.spec_id, equality_ids=None, key_metadata=None,
            **stats.to_serialized_dict()))
    return out


def _summary_properties(properties: Mapping[str, Any] | None) -> dict[str, str]:
    summary = {str(k): str(v) for k, v in (properties or {}).items()}
    reserved = sorted(k for k in summary if k in _RESERVED_SUMMARY_KEYS
                      or k.startswith(PARTITION_SUMMARY_PREFIX))
    if reserved:
        raise ValueError(f"snapshot summary key(s) {reserved} are Iceberg's own; use a prefix "
                         "such as 'pipeline.'")
    return summary
