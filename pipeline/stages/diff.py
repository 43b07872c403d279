"""The nightly diff: today's rows against the previous snapshot's, keyed by id. No Ray.

Today's rows get a content hash (:func:`hash_rows`: the SHA-256, first 128 bits, of the text
with its task prefix, the text the encoder sees) and an id bucket; the previous snapshot's
rows (:func:`read_previous`: id, hash, vectors), with ``--doc-vectors`` its document vectors
(:func:`read_previous_documents`: id, hash, one vector per width) and, on a resume, the ids
this snapshot already committed (:func:`read_seen`) get the same buckets. The cluster's graph
groups all of them by bucket (a Ray Data shuffle), so each id's rows meet in one call of
:func:`diff_bucket`, which marks today's rows new, changed or unchanged in Arrow, attaches
the previous vectors to unchanged rows when they are reused, and rejects an id that occurs in
more than one of today's files (a snapshot keys rows by id). :func:`plan_diff` decides, on the
driver, whether the previous vectors can be reused and how many buckets there are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pandas.util import hash_array  # vectorised SipHash with a fixed key: one hash everywhere

from .. import units
from ..config import embedding_column
from ..io import schema as S
from ..io.errors import OutputError
from ..io.storage import open_filesystem, storage_errors
from ..tokenize import add_prefix, task_prefix
from .carry import check_rows, take_ranges

HASH_COLUMN = "content_hash"
HASH_HEX_CHARS = 32  # 128 bits of SHA-256
# A bucket of rows per this many bytes of input (and of the previous snapshot), at least
# two per CPU: each bucket is one diff call's table.
BUCKET_BYTES = 256 << 20
MAX_BUCKETS = 4096
# Today's ids gathered before the shuffle (:func:`today_ids`, on the driver: 8 bytes each) at
# most; a night with more rows to read lets every id already in the snapshot into the shuffle.
MAX_TODAY_IDS = 16_000_000
# Chunking options that add output but change no vector: a night that switches them still
# reuses the previous chunk vectors (document vectors need the previous snapshot's own).
OUTPUT_ONLY_CHUNKING = ("chunk_text", "doc_vectors")


def prev_doc_embedding(width: int) -> str:
    """The previous snapshot's document vector of one width (``--doc-vectors``), carried to
    the encoder for a reused document."""
    return f"__prev_doc_{width}"


@dataclasses.dataclass(frozen=True)
class Diff:
    """How today's rows are compared with the previous snapshot's (the diff stage's plan)."""

    task: str
    buckets: int
    previous_files: tuple[tuple[str, int], ...]  # (URI, bytes) of its part files
    id_column: str
    id_type: Any  # today's id type; the previous ids are cast to it
    dims: tuple[int, ...]
    reuse: bool  # its settings equal today's: unchanged rows take its vectors
    output_dtype: str = "float32"  # of its vectors (today's, when they are reused)
    # Part files this snapshot committed before a resume, with their source: (URI, source).
    seen_files: tuple[tuple[str, str], ...] = ()
    # The one schema of every table entering the shuffle: Ray's hash shuffle concatenates the
    # tables of a partition as they are (no promotion), so both sides must agree exactly.
    schema: pa.Schema | None = None
    # Why every row is embedded again (None: unchanged rows reuse the previous vectors).
    reembed_reason: str | None = None
    # Bytes compared: today's units still to do and the previous snapshot's part files.
    bytes: int = 0
    # --long-text chunk: snapshots hold one row per chunk; a document's chunk vectors travel
    # as one list per width, and an unchanged document keeps all of them.
    chunked: bool = False
    previous_chunked: bool = False  # the previous snapshot's rows are chunks (its settings)
    # --doc-vectors: today's snapshot writes one vector per document; a reused document takes
    # the previous snapshot's (its _documents/ files, read when the vectors are reused).
    doc_vectors: bool = False
    previous_documents: tuple[tuple[str, int], ...] = ()  # (URI, bytes)
    # The previous part files of units whose unchanged files are copied, not read
    # (pipeline/stages/carry.py): (URI, bytes), and by URI the unit's name, the rows to read
    # as previous rows (its changed files') and those to read as seen ids (its copied
    # files'), as (start, rows) ranges (:func:`read_touched`).
    touched_files: tuple[tuple[str, int], ...] = ()
    touched: dict[str, tuple[str, list[tuple[int, int]], list[tuple[int, int]]]] = \
        dataclasses.field(default_factory=dict)
    # Today's rows are read first and their ids gathered (:func:`today_ids`), so that the ids
    # already in the snapshot enter the shuffle only where today's rows may hold them: set
    # when those ids outnumber today's rows (:func:`worth_gathering`).
    gather_today: bool = False

    def for_tasks(self) -> "Diff":
        """This plan without its file lists, which only the driver needs (to build the graph):
        what the read and diff tasks carry (at lake scale the lists hold thousands of files)."""
        return dataclasses.replace(self, previous_files=(), previous_documents=(),
                                   seen_files=(), touched_files=(), touched={})

    def prev_type(self, width: int) -> pa.DataType:
        """The type of a previous vector column in the shuffle: a variable-size list of the
        vector's values (a list of chunk vectors when chunked). Not the output's fixed-size
        list: there every null takes ``width`` values' room, and every row that enters the
        shuffle without a previous vector (today's rows, the ids already in the snapshot)
        would carry ``width`` zeros of each width (6 KB a row at 768/512/256 in float32)."""
        one = S.embedding_type(width, self.output_dtype)
        return pa.list_(one) if self.chunked else pa.list_(one.value_type)

    def prev_doc_type(self, width: int) -> pa.DataType:
        """The type of a previous document vector column in the shuffle (see
        :meth:`prev_type`)."""
        return pa.list_(S.embedding_type(width, self.output_dtype).value_type)

    @property
    def reuse_documents(self) -> bool:
        """Whether reused documents take their document vectors from the previous snapshot."""
        return self.reuse and self.chunked and self.doc_vectors


def worth_gathering(held_bytes: int, held_rows: int, read_bytes: int) -> bool:
    """Whether to gather today's ids before the shuffle (``Diff.gather_today``): when the
    input bytes of the units the snapshot already holds (``held_bytes``, ``held_rows``: kept,
    carried or copied, by their manifests) exceed those read today, and today's rows, at the
    held units' bytes per row, stay under :data:`MAX_TODAY_IDS`."""
    if held_bytes <= read_bytes or held_rows <= 0:
        return False
    return read_bytes * held_rows / held_bytes <= MAX_TODAY_IDS


def diff_schema(read, diff: Diff) -> pa.Schema:
    """Today's rows' columns (``read``: the run's ReadSpec), then the previous snapshot's and
    the resumed snapshot's; each side leaves the others' columns null."""
    fields = [(S.ID, read.id_type or pa.string()), (S.TEXT, pa.large_string()),
              (S.SOURCE, pa.string()), (S.UNIT, pa.string()), (S.ROW, pa.int64()),
              (S.FILE_ROWS, pa.int64()), (S.FILE_ROWSUM, pa.int64()),
              (S.REJECT, pa.string()), (S.EXCERPT, pa.string())]
    for c in read.keep_columns:
        kind = read.keep_type(c)
        fields.append((c, kind if isinstance(kind, pa.DataType) else pa.string()))
    fields += [(S.HASH, pa.string()), (S.BUCKET, pa.int64()), (S.PREV_HASH, pa.string())]
    if diff.reuse:
        fields += [(S.prev_embedding(d), diff.prev_type(d)) for d in diff.dims]
    if diff.reuse_documents:
        fields += [(prev_doc_embedding(d), diff.prev_doc_type(d)) for d in diff.dims]
    fields.append((S.SEEN, pa.bool_()))
    return pa.schema(fields)


def conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order and types (nulls for the
    columns it lacks)."""
    if schema is None:
        return table
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns {sorted(extra)} are not part of the diff's schema")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table[field.name]
            columns.append(column if column.type == field.type else column.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def content_hash(prefixed: str) -> str:
    """The ``content_hash`` of a text as the encoder sees it (task prefix included)."""
    return hashlib.sha256(prefixed.encode("utf-8")).hexdigest()[:HASH_HEX_CHARS]


def _splitmix64(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Integer ids (any width; nulls as 0) mixed to 64 bits by splitmix64's finaliser."""
    x = pc.fill_null(ids, 0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):  # wrapping on purpose
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bucket_of(ids: pa.ChunkedArray | pa.Array, buckets: int) -> pa.Array:
    """A bucket in ``[0, buckets)`` per id, the same in every process (nulls: bucket 0)."""
    ids = plain(ids)
    t = ids.type
    if pa.types.is_integer(t):
        return pa.array((_splitmix64(ids) % np.uint64(buckets)).astype(np.int64))
    values = ids.to_pylist()
    return pa.array([0 if v is None else zlib.crc32(v.encode("utf-8") if isinstance(v, str)
                                                    else bytes(v)) % buckets
                     for v in values], pa.int64())


def id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 64-bit hash per id, the same in every process for ids of one kind whatever their
    width or layout (see :func:`id_kind`): what :func:`today_ids` gathers and :func:`among`
    looks up (both set nulls apart). Two ids may share a hash; an id never gets two."""
    ids = plain(ids)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_integer(ids.type):
        return _splitmix64(ids)
    return hash_array(ids.to_numpy(zero_copy_only=False).astype(object),
                      categorize=False) if len(ids) else np.empty(0, np.uint64)


def today_ids(table: pa.Table) -> np.ndarray:
    """The sorted distinct :func:`id_hashes` of a table of today's rows (the shuffle's
    layout; null ids left out: they are rejected): gathered over all of today's rows before
    the shuffle, so that the ids already in the snapshot enter it only where today's rows
    may hold them (:func:`read_seen`)."""
    if S.ID not in table.column_names:  # an empty block may have no column at all
        return np.empty(0, np.uint64)
    return np.unique(id_hashes(table[S.ID].drop_null()))


def among(ids: pa.Array, today: np.ndarray) -> np.ndarray:
    """Whether each id's hash is in ``today`` (sorted :func:`id_hashes`): True for every id
    today holds, for the few others whose hash it shares, and for a null."""
    hashes = id_hashes(ids)
    found = np.zeros(len(hashes), bool)
    if len(today):
        at = np.searchsorted(today, hashes)
        at[at == len(today)] = 0
        found = today[at] == hashes
    if ids.null_count:
        found |= pc.is_null(ids).to_numpy(zero_copy_only=False)
    return found


def id_kind(kind: pa.DataType) -> str:
    """Integer, string or binary: ids of one kind compare whatever their width or layout
    (int32 and int64, string and large_string, dictionary-encoded or not)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "string"
    return "binary" if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                        or pa.types.is_fixed_size_binary(kind)) else str(kind)


def plain(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """``values`` without dictionary encoding (ids compare and sort by value)."""
    if pa.types.is_dictionary(values.type):
        return pc.cast(values, values.type.value_type)
    return values


def hash_rows(table: pa.Table, task: str, buckets: int, schema: pa.Schema | None = None) -> pa.Table:
    """Add each row's content hash and id bucket; reject rows that cannot be embedded (the
    one rule the tokenizer stage applies, applied here so that only embeddable rows take part
    in the diff)."""
    prefix = task_prefix(task)
    rejects = table[S.REJECT].to_pylist()
    excerpts = table[S.EXCERPT].to_pylist()
    ids_null = pc.is_null(table[S.ID]).to_pylist()
    texts = table[S.TEXT].to_pylist()
    hashes: list[str | None] = [None] * table.num_rows
    for i in S.reject_unembeddable(ids_null, texts, rejects, excerpts):
        hashes[i] = content_hash(add_prefix(texts[i], prefix))
    out = table.drop_columns([S.REJECT, S.EXCERPT, S.TEXT])
    # Texts as one type whatever the file stored; a rejected row's is not needed any more.
    text = pa.array([t if h is not None else None for t, h in zip(texts, hashes)],
                    pa.large_string())
    out = out.append_column(S.TEXT, text) \
        .append_column(S.REJECT, pa.array(rejects, pa.string())) \
        .append_column(S.EXCERPT, pa.array(excerpts, pa.string())) \
        .append_column(S.HASH, pa.array(hashes, pa.string())) \
        .append_column(S.BUCKET, bucket_of(table[S.ID], buckets))
    return conform(out, schema)


def read_previous(uri: str, diff: Diff, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """The previous snapshot's rows of one part file: id, hash, (vectors), bucket; chunked,
    one row per document (its chunks' vectors as lists)."""
    fs, path = open_filesystem(uri, storage_options)
    columns = _previous_columns(diff)
    if diff.previous_chunked:
        columns += ["chunk", "chunks"]
    with storage_errors(uri, "read the previous snapshot's"), fs.open(path, "rb") as f:
        batches = pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns)
        if diff.previous_chunked:
            batches = documents_of(batches, diff, uri)
        for batch in batches:
            yield _previous_rows(batch, diff, uri)


def _previous_columns(diff: Diff) -> list[str]:
    columns = [diff.id_column, HASH_COLUMN]
    if diff.reuse:
        columns += [embedding_column(d) for d in diff.dims]
    return columns


def _previous_rows(batch: pa.RecordBatch | pa.Table, diff: Diff, uri: str) -> pa.Table:
    """Previous rows in the shuffle's layout: id, previous hash, (vectors), bucket."""
    ids = _as_today_ids(batch.column(diff.id_column), diff, uri)
    out = {S.ID: ids, S.PREV_HASH: batch.column(HASH_COLUMN)}
    if diff.reuse:
        out |= {S.prev_embedding(d): batch.column(embedding_column(d)) for d in diff.dims}
    out[S.BUCKET] = bucket_of(ids, diff.buckets)
    return conform(pa.table(out), diff.schema)


def read_touched(uri: str, source: str, changed: list[tuple[int, int]],
                 copied: list[tuple[int, int]], diff: Diff,
                 storage_options: dict[str, Any],
                 today: np.ndarray | None = None) -> Iterator[pa.Table]:
    """One previous part file of a touched unit (``source``: the unit's name), read once: the
    rows of its changed files (``changed`` ranges) as previous rows, and the ids of its
    copied files (``copied`` ranges, ``pipeline/stages/carry.py``) as seen ids (with
    ``today``, only those today's rows may hold: see :func:`read_seen`). Hashes and vectors
    are decoded only from the row groups that hold changed rows."""
    fs, path = open_filesystem(uri, storage_options)
    rows = sum(n for _, n in changed) + sum(n for _, n in copied)  # every row of the file
    with storage_errors(uri, "read the previous snapshot's"), fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        ids = parquet.read(columns=[diff.id_column])
        check_rows(ids.num_rows, rows, uri)
        if changed:
            groups, local = _row_groups_of(parquet.metadata, changed)
            previous = parquet.read_row_groups(groups, columns=_previous_columns(diff))
            previous = take_ranges(previous, local, uri, previous.num_rows)
    if changed:
        for batch in previous.to_batches(max_chunksize=65536):
            yield _previous_rows(batch, diff, uri)
    for batch in take_ranges(ids, copied, uri, rows).to_batches(max_chunksize=65536):
        yield _seen_rows(batch.column(diff.id_column), source, diff, today)


def _row_groups_of(metadata: pq.FileMetaData, ranges: list[tuple[int, int]]
                   ) -> tuple[list[int], list[tuple[int, int]]]:
    """The row groups of a Parquet file that hold rows of ``ranges`` (``(start, rows)``, in
    order), and those ranges' places among the rows of these row groups alone."""
    bounds = np.cumsum([0] + [metadata.row_group(i).num_rows
                              for i in range(metadata.num_row_groups)])
    wanted: set[int] = set()
    for start, n in ranges:
        if n:
            first = int(np.searchsorted(bounds, start, side="right")) - 1
            last = int(np.searchsorted(bounds, start + n - 1, side="right")) - 1
            wanted.update(range(first, last + 1))
    groups = sorted(wanted)
    # A row's place among the chosen row groups' rows: its own, less the rows of the row
    # groups left out before its own.
    left_out, skipped, before = {}, 0, 0
    for g in groups:
        skipped += int(bounds[g]) - before
        left_out[g] = skipped
        before = int(bounds[g + 1])
    local = []
    for start, n in ranges:
        if n:
            g = int(np.searchsorted(bounds, start, side="right")) - 1
            local.append((start - left_out[g], n))
    return groups, local


def read_previous_documents(uri: str, diff: Diff,
                            storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """The previous snapshot's document vectors of one ``_documents/`` file: id, hash (in the
    previous hash's column), one vector per width (a document row is told from the
    previous snapshot's chunk rows by these), bucket."""
    fs, path = open_filesystem(uri, storage_options)
    vectors = {prev_doc_embedding(d): embedding_column(d) for d in diff.dims}
    with storage_errors(uri, "read the previous snapshot's"), fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(
                batch_size=65536, columns=[diff.id_column, HASH_COLUMN, *vectors.values()]):
            ids = _as_today_ids(batch.column(diff.id_column), diff, uri)
            out = {S.ID: ids, S.PREV_HASH: batch.column(HASH_COLUMN)}
            for name, column in vectors.items():
                out[name] = batch.column(column)
                if out[name].null_count or out[S.PREV_HASH].null_count:
                    raise OutputError(f"{uri}: a document of the previous snapshot has no "
                                     f"{column} or {HASH_COLUMN}; the snapshot is damaged")
            out[S.BUCKET] = bucket_of(ids, diff.buckets)
            yield conform(pa.table(out), diff.schema)


def _as_today_ids(ids: pa.Array, diff: Diff, uri: str) -> pa.Array:
    """The previous snapshot's ids cast to today's id type."""
    if diff.id_type is None or ids.type == diff.id_type:
        return ids
    try:
        return pc.cast(ids, diff.id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise OutputError(f"{uri}: the previous snapshot's ids ({ids.type}) do not convert to "
                         f"today's id type {diff.id_type}: {err}") from err


def documents_of(batches: Iterator[pa.RecordBatch], diff: Diff, uri: str) -> Iterator[pa.Table]:
    """Chunk rows (a document's chunks follow each other, 0 first, in one file) grouped into
    one row per document: the id, the hash and each width's chunk vectors as a list. A
    document cut by a batch boundary is completed from the next batch."""
    carry = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        starts = np.flatnonzero(table["chunk"].to_numpy() == 0)
        if not len(starts) or starts[0] != 0:
            raise OutputError(f"{uri}: the previous snapshot's chunk rows do not start with a "
                             "document's chunk 0; the snapshot is damaged")
        carry = table.slice(int(starts[-1]))
        done = table.slice(0, int(starts[-1]))
        if done.num_rows:
            yield _grouped(done, starts[:-1], diff, uri)
    if carry is not None and carry.num_rows:
        yield _grouped(carry, np.array([0]), diff, uri)


def _grouped(table: pa.Table, starts: np.ndarray, diff: Diff, uri: str) -> pa.Table:
    offsets = np.append(starts, table.num_rows).astype(np.int32)
    counts = np.diff(offsets)
    if (table["chunks"].take(pa.array(starts)).to_numpy() != counts).any():
        raise OutputError(f"{uri}: a document of the previous snapshot lacks some of its "
                         "chunks; the snapshot is damaged")
    out = {diff.id_column: table[diff.id_column].take(pa.array(starts)),
           HASH_COLUMN: table[HASH_COLUMN].take(pa.array(starts))}
    for d in diff.dims if diff.reuse else ():
        values = table[embedding_column(d)].combine_chunks()
        out[embedding_column(d)] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(out)


def read_seen(uri: str, source: str, diff: Diff, storage_options: dict[str, Any],
              today: np.ndarray | None = None) -> Iterator[pa.Table]:
    """The ids of one part file this snapshot already holds (committed before a resume, or
    carried from the previous snapshot), marked as seen; ``source``: its input file.

    ``today``: the :func:`today_ids` of all of today's rows, when they were gathered first;
    then only the ids among them are kept (an id today does not hold rejects nothing), so a
    night that reads 1% of the input shuffles ~1% of the snapshot's ids, not all of them."""
    fs, path = open_filesystem(uri, storage_options)
    with storage_errors(uri, "read the resumed snapshot's"), fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[diff.id_column]):
            yield _seen_rows(batch.column(diff.id_column), source, diff, today)


def _seen_rows(ids: pa.Array, source: str, diff: Diff,
               today: np.ndarray | None = None) -> pa.Table:
    """Ids in the shuffle's layout, marked as seen (``source``: where they are); with
    ``today``, only those whose hash today's rows hold."""
    if today is not None:
        ids = ids.filter(pa.array(among(ids, today)))
    if diff.chunked:
        ids = pc.unique(ids)  # an id per chunk
    n = len(ids)
    return conform(pa.table({S.ID: ids, S.SEEN: pa.array([True] * n),
                             S.SOURCE: pa.array([source] * n, pa.string()),
                             S.BUCKET: bucket_of(ids, diff.buckets)}), diff.schema)


def diff_bucket(table: pa.Table, diff: Diff) -> Iterator[pa.Table]:
    """Today's rows of one bucket, each marked new, changed or unchanged against the previous
    snapshot's rows in the same table (those are dropped), with the previous vectors attached
    to unchanged rows when they are reused. With ``--doc-vectors`` an unchanged document is
    reused only with its previous document vector (same hash), which is attached too;
    without one it is encoded again. A later row of an id that occurs in more than one file
    is rejected. Rejected rows pass through unmarked."""
    if S.UNIT not in table.column_names:
        return  # only the previous snapshot's rows reached this bucket: deleted ids
    today_mask = pc.is_valid(table[S.UNIT])
    today = table.filter(today_mask)
    if not today.num_rows:
        return  # only deleted ids in this bucket
    others = table.filter(pc.invert(today_mask))
    # (a column may be missing, or null-typed, in tables not made by conform(): tests)
    seen_mask = pc.is_valid(others[S.SEEN]) if S.SEEN in others.column_names \
        else pa.array([False] * others.num_rows, pa.bool_())
    previous, seen = others.filter(pc.invert(seen_mask)), others.filter(seen_mask)
    previous, documents = _split_documents(previous, diff)
    rejects = today[S.REJECT].to_pylist()
    excerpts = today[S.EXCERPT].to_pylist()
    _reject_repeated_ids(today, rejects, excerpts)
    if seen.num_rows:
        _reject_seen_ids(today, seen, rejects, excerpts)
    rejected = pa.array([r is not None for r in rejects])

    prev_cols = [c for c in today.column_names
                 if c in (S.PREV_HASH, S.SEEN) or c.startswith("__prev_")]
    ids, hashes = plain(today[S.ID].combine_chunks()), today[S.HASH].combine_chunks()
    match = _matches(ids, previous)
    same = pc.fill_null(pc.equal(_take(previous, S.PREV_HASH, match, pa.string()), hashes),
                        False)
    change = pc.if_else(pc.is_null(match), "new", pc.if_else(same, "unchanged", "changed"))
    change = pc.if_else(rejected, pa.scalar(None, pa.string()), change)
    reuse = pc.and_(pc.equal(pc.fill_null(change, ""), "unchanged"), pa.scalar(diff.reuse))
    if diff.reuse_documents:
        doc_match = _matches(ids, documents)
        doc_hash = _take(documents, S.PREV_HASH, doc_match, pa.string())
        reuse = pc.and_(reuse, pc.fill_null(pc.equal(doc_hash, hashes), False))

    out = today.drop_columns(prev_cols + [S.REJECT, S.EXCERPT, S.BUCKET])
    out = out.append_column(S.REJECT, pa.array(rejects, pa.string())) \
        .append_column(S.EXCERPT, pa.array(excerpts, pa.string())) \
        .append_column(S.CHANGE, change).append_column(S.REUSE, reuse)
    if diff.reuse:
        taken = pc.if_else(reuse, match, pa.scalar(None, match.type))
        for d in diff.dims:
            out = out.append_column(S.prev_embedding(d), _take(
                previous, S.prev_embedding(d), taken, diff.prev_type(d)))
    if diff.reuse_documents:
        taken = pc.if_else(reuse, doc_match, pa.scalar(None, doc_match.type))
        for d in diff.dims:
            out = out.append_column(prev_doc_embedding(d), _take(
                documents, prev_doc_embedding(d), taken, diff.prev_doc_type(d)))
    yield out


def _split_documents(previous: pa.Table, diff: Diff) -> tuple[pa.Table, pa.Table | None]:
    """The previous snapshot's rows of a bucket: (chunk or row hashes, document vectors).
    A document row is the one with a document vector (:func:`read_previous_documents`)."""
    if not diff.reuse_documents:
        return previous, None
    column = prev_doc_embedding(diff.dims[0])
    if column not in previous.column_names:  # (tables not made by conform(): tests)
        return previous, previous.slice(0, 0)
    is_doc = pc.is_valid(previous[column])
    return previous.filter(pc.invert(is_doc)), previous.filter(is_doc)


def _matches(ids: pa.Array, rows: pa.Table) -> pa.Array:
    """The index in ``rows`` of each id (null where it has none)."""
    if not rows.num_rows:
        return pa.nulls(len(ids), pa.int32())
    return pc.index_in(ids, value_set=plain(rows[S.ID].combine_chunks()))


def _take(rows: pa.Table, column: str, index: pa.Array, kind: pa.DataType) -> pa.Array:
    """``rows[column]`` at ``index`` (null where the index is), of type ``kind`` (the
    output's fixed-size vectors, as tables not made by conform() hold them, become the
    shuffle's lists)."""
    values = rows[column].combine_chunks() if rows.num_rows else pa.nulls(0, kind)
    taken = pc.take(values, index)
    return taken if taken.type == kind else taken.cast(kind)


def _reject_repeated_ids(today: pa.Table, rejects: list, excerpts: list) -> None:
    """Reject (in place) every embeddable row of an id but the first by (file, row)."""
    good = np.flatnonzero([r is None for r in rejects])
    if len(good) < 2:
        return
    order = pa.table({"id": plain(today[S.ID].take(good)), "source": today[S.SOURCE].take(good),
                      "row": today[S.ROW].take(good), "i": pa.array(good)}) \
        .sort_by([("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    sorted_ids = order["id"].combine_chunks()
    repeat = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1))
    repeats = np.flatnonzero(pc.fill_null(repeat, False).to_numpy(zero_copy_only=False)) + 1
    if not len(repeats):
        return
    firsts = np.setdiff1d(np.arange(len(sorted_ids)), repeats)
    for k in repeats:
        first = firsts[np.searchsorted(firsts, k, side="right") - 1]
        i = order["i"][int(k)].as_py()
        rejects[i] = (f"duplicate id: also in {order['source'][int(first)].as_py()} row "
                      f"{order['row'][int(first)].as_py()} (a snapshot keys rows by id)")
        excerpts[i] = S.excerpt(str(order["id"][int(k)].as_py()))


def _reject_seen_ids(today: pa.Table, seen: pa.Table, rejects: list, excerpts: list) -> None:
    """Reject (in place) today's embeddable rows whose id a unit this snapshot already holds
    (committed earlier by a resumed run, or carried unchanged from the previous snapshot)."""
    ids = plain(today[S.ID].combine_chunks())
    where = pc.index_in(ids, value_set=plain(seen[S.ID].combine_chunks()))
    sources = seen[S.SOURCE]
    for i, k in enumerate(where.to_pylist()):
        if k is not None and rejects[i] is None:
            rejects[i] = (f"duplicate id: also in {sources[k].as_py()} (committed earlier in "
                          "this snapshot, or unchanged since the previous one; a snapshot "
                          "keys rows by id)")
            excerpts[i] = S.excerpt(str(ids[i].as_py()))


def _chunked(identity: dict[str, Any] | None) -> bool:
    """Whether a run of this identity writes one row per chunk (``--long-text chunk``)."""
    return _chunking(identity).get("mode") == "chunk"


def _chunking(identity: dict[str, Any] | None) -> dict[str, Any]:
    return (identity or {}).get("long_text") or {}


def _setting(identity: dict[str, Any], field: str) -> Any:
    """A setting of the vectors: the identity's field (chunking without its output-only
    options, :data:`OUTPUT_ONLY_CHUNKING`)."""
    value = identity.get(field)
    if field == "long_text" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in OUTPUT_ONLY_CHUNKING}
    return value


def plan_diff(*, identity: dict[str, Any], read, previous_identity: dict[str, Any] | None,
              previous_files: tuple[tuple[str, int], ...], todo_bytes: int,
              seen_files: tuple[tuple[str, str], ...], cpus: float,
              previous_documents: tuple[tuple[str, int], ...] = ()) -> Diff:
    """How today's rows meet the previous snapshot's: a pure function of what the driver knows.

    ``identity`` is today's run identity (``pipeline.units``: task, id column, widths, output
    dtype and the other settings), ``read`` the run's ReadSpec
    (today's id type and kept columns), ``previous_*`` the snapshot ``_LATEST`` names (None
    before the first night; ``previous_documents`` its ``_documents/`` files), ``todo_bytes``
    the bytes of today's units still to do, ``seen_files`` the part files (and their sources)
    this snapshot committed before a resume.
    The previous vectors are reused only when its settings equal today's (``--keep-chunk-text``
    and ``--doc-vectors`` aside: they change no vector); ids of another kind are other ids, so
    nothing is compared and every row is new. With ``--doc-vectors`` a reused document needs
    its previous document vector: a previous snapshot made without them is embedded again
    (its chunks' stored vectors are cut and normalised, so their pooled mean cannot be
    recovered from them).
    """
    reuse, reason, files = False, "first snapshot", ()
    doc_vectors = bool(_chunking(identity).get("doc_vectors"))
    if previous_identity is not None:
        files = tuple(previous_files)
        differs = [f for f in units.IDENTITY_FIELDS
                   if _setting(previous_identity, f) != _setting(identity, f)]
        reuse = not differs
        reason = None if reuse else "settings changed: " + ", ".join(differs)
        if reuse and doc_vectors and not _chunking(previous_identity).get("doc_vectors"):
            reuse = False
            reason = "the previous snapshot has no document vectors (made without --doc-vectors)"
        prev_type = units.decode_types(previous_identity["types"])[0] \
            if previous_identity.get("types") else None
        if prev_type is not None and read.id_type is not None \
                and id_kind(prev_type) != id_kind(read.id_type):
            reuse, files = False, ()
            reason = f"id type changed: {prev_type} -> {read.id_type}"
    documents = tuple(previous_documents) if reuse and doc_vectors else ()
    total = todo_bytes + sum(size for _, size in files + documents)
    buckets = min(MAX_BUCKETS, max(1, 2 * int(cpus), -(-total // BUCKET_BYTES)))
    diff = Diff(task=identity["task"], buckets=int(buckets), previous_files=files,
                id_column=identity["id_column"], id_type=read.id_type,
                dims=tuple(identity["dims"]), reuse=reuse,
                output_dtype=identity["output_dtype"], seen_files=tuple(seen_files),
                reembed_reason=reason, bytes=int(total),
                chunked=_chunked(identity), previous_chunked=_chunked(previous_identity),
                doc_vectors=doc_vectors, previous_documents=documents)
    return dataclasses.replace(diff, schema=diff_schema(read, diff))
