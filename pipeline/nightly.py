"""The nightly re-embedding job: snapshots that embed only what changed since the last one.

    python -m pipeline nightly --input URI --output URI [run options] [--keep-snapshots N]

Each run writes a complete snapshot of the corpus to a folder of its own,
``<output>/snapshot-<UTC time>/``, laid out like any run's output (part files, ``_rejects/``,
``_manifest/``, ``_summary.json``) plus a ``content_hash`` column: the SHA-256 (first 128 bits,
hex) of the row's text with its task prefix, the text the encoder sees. When the snapshot is
complete, ``<output>/_LATEST`` (the folder's name) is replaced in one PUT, so readers that
follow it see the old snapshot or the new one, never a mix. Snapshots older than the newest
``--keep-snapshots`` are then deleted.

What is embedded: rows are keyed by id. A row whose id is not in the previous snapshot is
*new*; one whose content hash differs is *changed*; both are encoded. An *unchanged* row takes
the previous snapshot's vectors as they are (it is neither tokenized nor encoded), and ids of
the previous snapshot that are gone today are *deleted* (not carried over). The previous
snapshot's settings (model fingerprint, tokenizer, task, widths, dtypes, columns; see
:data:`pipeline.units.IDENTITY_FIELDS`) must equal today's for its vectors to be reused;
otherwise every row is encoded again (the counts still compare the two snapshots).

How rows meet their previous version: today's rows and the previous snapshot's (id, hash,
vectors) are hashed by id into buckets and grouped with Ray Data's hash shuffle
(``groupby().map_groups``), so each id's rows meet in one call of :func:`diff_bucket`, which
classifies them in Arrow. The same call rejects an id that occurs in more than one of today's
files (a snapshot keys rows by id; the first by file and row is kept), which a plain run does
not check. A killed run is resumed by the next one: an unfinished snapshot built on the same
previous snapshot is picked up with its committed units (``pipeline/units.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import re
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import units
from .config import RunConfig, embedding_column
from .io import schema as S
from .runner import PlainRun, run
from .io.storage import (MANIFEST_DIR, REJECTS_DIR, SUMMARY_NAME, OutputError, open_filesystem,
                         open_for_publish, prepare_output, storage_errors, to_uri)
from .tokenize import add_prefix, task_prefix, text_problem

log = logging.getLogger("pipeline.nightly")

LATEST = "_LATEST"
HASH_COLUMN = "content_hash"
HASH_HEX_CHARS = 32  # 128 bits of SHA-256
SNAPSHOT_RE = re.compile(r"^snapshot-\d{8}T\d{6}Z(-\d+)?$")
# A bucket of rows per this many bytes of input (and of the previous snapshot), at least
# two per CPU: each bucket is one diff call's table.
BUCKET_BYTES = 256 << 20
MAX_BUCKETS = 4096


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
        fields += [(S.prev_embedding(d), S.embedding_type(d, diff.output_dtype)) for d in diff.dims]
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


def bucket_of(ids: pa.ChunkedArray | pa.Array, buckets: int) -> pa.Array:
    """A bucket in ``[0, buckets)`` per id, the same in every process (nulls: bucket 0)."""
    ids = plain(ids)
    t = ids.type
    if pa.types.is_integer(t):
        x = pc.fill_null(ids, 0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        with np.errstate(over="ignore"):  # splitmix64's finaliser, wrapping on purpose
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return pa.array((x % np.uint64(buckets)).astype(np.int64))
    values = ids.to_pylist()
    return pa.array([0 if v is None else zlib.crc32(v.encode("utf-8") if isinstance(v, str)
                                                    else bytes(v)) % buckets
                     for v in values], pa.int64())


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
    tokenizer's checks, made here so that only embeddable rows take part in the diff)."""
    prefix = task_prefix(task)
    rejects = table[S.REJECT].to_pylist()
    excerpts = table[S.EXCERPT].to_pylist()
    ids_null = pc.is_null(table[S.ID]).to_pylist()
    texts = table[S.TEXT].to_pylist()
    hashes: list[str | None] = [None] * table.num_rows
    for i, text in enumerate(texts):
        if rejects[i] is not None:
            continue
        reason = "id is null" if ids_null[i] else text_problem(text)
        if reason:
            rejects[i], excerpts[i] = reason, S.excerpt(text)
        else:
            hashes[i] = content_hash(add_prefix(text, prefix))
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
    """The previous snapshot's rows of one part file: id, hash, (vectors), bucket."""
    fs, path = open_filesystem(uri, storage_options)
    columns = [diff.id_column, HASH_COLUMN]
    if diff.reuse:
        columns += [embedding_column(d) for d in diff.dims]
    with storage_errors(uri, "read the previous snapshot's"), fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
            ids = batch.column(diff.id_column)
            if diff.id_type is not None and ids.type != diff.id_type:
                try:
                    ids = pc.cast(ids, diff.id_type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    raise ValueError(f"{uri}: the previous snapshot's ids ({ids.type}) do not "
                                     f"convert to today's id type {diff.id_type}: {err}") from err
            out = {S.ID: ids, S.PREV_HASH: batch.column(HASH_COLUMN)}
            if diff.reuse:
                out |= {S.prev_embedding(d): batch.column(embedding_column(d)) for d in diff.dims}
            out[S.BUCKET] = bucket_of(ids, diff.buckets)
            yield conform(pa.table(out), diff.schema)


def read_seen(uri: str, diff: Diff, source: str, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """The ids of one part file this snapshot committed before a resume, marked as seen."""
    fs, path = open_filesystem(uri, storage_options)
    with storage_errors(uri, "read the resumed snapshot's"), fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[diff.id_column]):
            ids = batch.column(diff.id_column)
            n = len(ids)
            yield conform(pa.table({S.ID: ids, S.SEEN: pa.array([True] * n),
                                    S.SOURCE: pa.array([source] * n, pa.string()),
                                    S.BUCKET: bucket_of(ids, diff.buckets)}), diff.schema)


def diff_bucket(table: pa.Table, diff: Diff) -> Iterator[pa.Table]:
    """Today's rows of one bucket, each marked new, changed or unchanged against the previous
    snapshot's rows in the same table (those are dropped), with the previous vectors attached
    to unchanged rows when they are reused. A later row of an id that occurs in more than one
    file is rejected. Rejected rows pass through unmarked."""
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
    rejects = today[S.REJECT].to_pylist()
    excerpts = today[S.EXCERPT].to_pylist()
    _reject_repeated_ids(today, rejects, excerpts)
    if seen.num_rows:
        _reject_seen_ids(today, seen, rejects, excerpts)
    rejected = pa.array([r is not None for r in rejects])

    prev_cols = [c for c in today.column_names
                 if c in (S.PREV_HASH, S.SEEN) or c.startswith("__prev_")]
    ids = plain(today[S.ID].combine_chunks())
    if previous.num_rows:
        match = pc.index_in(ids, value_set=plain(previous[S.ID].combine_chunks()))
        prev_hash = pc.take(previous[S.PREV_HASH].combine_chunks(), match)
    else:
        match = pa.nulls(today.num_rows, pa.int32())
        prev_hash = pa.nulls(today.num_rows, pa.string())
    same = pc.fill_null(pc.equal(prev_hash, today[S.HASH].combine_chunks()), False)
    change = pc.if_else(pc.is_null(match), "new", pc.if_else(same, "unchanged", "changed"))
    change = pc.if_else(rejected, pa.scalar(None, pa.string()), change)
    reuse = pc.and_(pc.equal(pc.fill_null(change, ""), "unchanged"), pa.scalar(diff.reuse))

    out = today.drop_columns(prev_cols + [S.REJECT, S.EXCERPT, S.BUCKET])
    out = out.append_column(S.REJECT, pa.array(rejects, pa.string())) \
        .append_column(S.EXCERPT, pa.array(excerpts, pa.string())) \
        .append_column(S.CHANGE, change).append_column(S.REUSE, reuse)
    if diff.reuse:
        taken = pc.if_else(reuse, match, pa.scalar(None, match.type))
        for d in diff.dims:
            column = previous[S.prev_embedding(d)].combine_chunks() if previous.num_rows \
                else pa.nulls(0, S.embedding_type(d, diff.output_dtype))
            out = out.append_column(S.prev_embedding(d), pc.take(column, taken))
    yield out


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
    """Reject (in place) today's embeddable rows whose id a unit committed earlier in this
    snapshot already holds (a resumed run)."""
    ids = plain(today[S.ID].combine_chunks())
    where = pc.index_in(ids, value_set=plain(seen[S.ID].combine_chunks()))
    sources = seen[S.SOURCE]
    for i, k in enumerate(where.to_pylist()):
        if k is not None and rejects[i] is None:
            rejects[i] = (f"duplicate id: also in {sources[k].as_py()} (committed earlier in "
                          "this snapshot; a snapshot keys rows by id)")
            excerpts[i] = S.excerpt(str(ids[i].as_py()))


# --- snapshots -----------------------------------------------------------------------------


@dataclasses.dataclass
class Previous:
    """The snapshot ``_LATEST`` names: its identity, row count and part files."""

    name: str
    identity: dict[str, Any]
    rows: int
    files: list[tuple[str, int]]


def read_latest(fs, root: str) -> str | None:
    """The snapshot ``<root>/_LATEST`` names, or None before the first run."""
    path = f"{root}/{LATEST}"
    with storage_errors(to_uri(fs, path), "read"):
        if not fs.exists(path):
            return None
        raw = fs.cat_file(path)
    name = raw.decode("utf-8", "replace").strip()
    if not SNAPSHOT_RE.match(name):
        raise OutputError(f"{to_uri(fs, path)} holds {name[:80]!r}, not a snapshot name; it was "
                          "not written by this job")
    return name


def list_snapshots(fs, root: str) -> dict[str, bool]:
    """Snapshot folders under ``root``: name -> complete (has its ``_summary.json``)."""
    with storage_errors(to_uri(fs, root), "list"):
        try:
            entries = fs.ls(root, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                 if e["type"] == "directory"]
        return {n: fs.exists(f"{root}/{n}/{SUMMARY_NAME}")
                for n in sorted(names) if SNAPSHOT_RE.match(n)}


def load_previous(fs, root: str, name: str, root_uri: str) -> Previous:
    """The complete snapshot ``name``: identity from its manifest, rows from its summary,
    part files from its unit manifests (with their sizes)."""
    base = f"{root}/{name}"
    uri = f"{root_uri}/{name}"
    with storage_errors(uri, "read the previous snapshot"):
        if not fs.exists(f"{base}/{SUMMARY_NAME}"):
            raise OutputError(f"{root_uri}/{LATEST} names {name}, which has no {SUMMARY_NAME}; "
                              f"restore {uri} or delete {LATEST} to start afresh")
        summary = json.loads(fs.cat_file(f"{base}/{SUMMARY_NAME}"))
        state = units.load_state(fs, base, sorted(fs.find(f"{base}/{MANIFEST_DIR}")))
        names = sorted(f for u in state.units.values() for f in u["files"]
                       if not f.startswith(REJECTS_DIR + "/"))
        sizes = fs.info  # one HEAD per part file (files are ~128 MiB; few per snapshot)
        files = [(f"{uri}/{n}", int(sizes(f"{base}/{n}")["size"])) for n in names]
    if state.identity is None:
        raise OutputError(f"{uri} has no {MANIFEST_DIR}/{units.RUN_FILE}: not a snapshot of "
                          "this job")
    return Previous(name, state.identity, int(summary.get("rows_out", 0)), files)


def new_snapshot_name(existing, now: datetime.datetime | None = None) -> str:
    """``snapshot-<UTC time>``, later than every existing name, so names sort in the order
    runs started: when that second (or a later one, the clock having gone back) is taken,
    the second after the newest name's."""
    now = (now or datetime.datetime.now(datetime.timezone.utc)).replace(microsecond=0)
    stamps = [datetime.datetime.strptime(n[len("snapshot-"):len("snapshot-") + 16],
                                         "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
              for n in existing if SNAPSHOT_RE.match(n)]
    if stamps and max(stamps) >= now:
        now = max(stamps) + datetime.timedelta(seconds=1)
    return "snapshot-" + now.strftime("%Y%m%dT%H%M%SZ")


def unfinished_snapshot(fs, root: str, snapshots: dict[str, bool], base: str | None) -> str | None:
    """The newest unfinished snapshot started on ``base`` (the same previous snapshot), which
    this run resumes; None if there is none."""
    for name in sorted(snapshots, reverse=True):
        if snapshots[name] or (base and name <= base):
            continue
        run_file = f"{root}/{name}/{MANIFEST_DIR}/{units.RUN_FILE}"
        try:
            identity = json.loads(fs.cat_file(run_file))["identity"]
        except (FileNotFoundError, KeyError, ValueError):
            continue
        if identity.get("nightly", {}).get("base") == base:
            return name
    return None


def publish(fs, root: str, name: str) -> None:
    """Point ``_LATEST`` at ``name``: one atomic PUT (a rename on local disks)."""
    with open_for_publish(fs, f"{root}/{LATEST}") as f:
        f.write((name + "\n").encode("utf-8"))


def prune(fs, root: str, latest: str, keep: int) -> list[str]:
    """Delete snapshots older than ``latest`` beyond the newest ``keep`` complete ones
    (``latest`` included), and unfinished ones older than ``latest``; returns their names."""
    snapshots = list_snapshots(fs, root)
    complete = sorted((n for n, done in snapshots.items() if done and n <= latest), reverse=True)
    kept = set(complete[:max(keep, 1)]) | {latest}
    gone = sorted(n for n in snapshots if n < latest and n not in kept)
    for name in gone:
        with storage_errors(to_uri(fs, f"{root}/{name}"), "delete"):
            fs.rm(f"{root}/{name}", recursive=True)
    return gone


# --- the job -------------------------------------------------------------------------------


class NightlyVariant(PlainRun):
    """What the nightly job changes in :func:`pipeline.runner.run`: the identity records the
    base snapshot, the graph diffs against it, the summary counts the changes."""

    def __init__(self, previous: Previous | None, snapshot: str) -> None:
        self.previous, self.snapshot = previous, snapshot
        self.reuse, self.reason = False, None
        self.settings: dict[str, Any] = {}

    def identity(self) -> dict[str, Any]:
        return {"nightly": {"base": self.previous.name if self.previous else None}}

    def output_spec(self, spec):
        return dataclasses.replace(spec, extra_columns=((HASH_COLUMN, S.HASH),))

    def dataset(self, plan, identity: dict[str, Any], cpus: float,
                kept: dict[str, dict[str, Any]]):
        from .graph import build_nightly_dataset

        self.settings = identity
        prev = self.previous
        if prev is not None:
            differs = [f for f in units.IDENTITY_FIELDS if prev.identity.get(f) != identity.get(f)]
            self.reuse = not differs
            self.reason = None if self.reuse else "settings changed: " + ", ".join(differs)
            if differs:
                log.warning("the previous snapshot %s was made with other %s; every row is "
                            "embedded again", prev.name, ", ".join(differs))
        files = tuple(prev.files) if prev else ()
        if prev is not None:
            prev_type = units.decode_types(prev.identity["types"])[0] \
                if prev.identity.get("types") else None
            if prev_type is not None and plan.read.id_type is not None \
                    and id_kind(prev_type) != id_kind(plan.read.id_type):
                # Ids of another type are other ids: nothing to compare, every row is new.
                self.reuse, files = False, ()
                self.reason = f"id type changed: {prev_type} -> {plan.read.id_type}"
                log.warning("the previous snapshot %s has %s ids, today's are %s; every row "
                            "is new", prev.name, prev_type, plan.read.id_type)
        # The units this snapshot committed before a resume: their ids take part in the
        # duplicate check (a resumed run must not write an id twice).
        seen = tuple(sorted((f"{plan.output_uri.rstrip('/')}/{name}", unit["uri"])
                            for unit in kept.values() for name in unit["files"]
                            if not name.startswith(REJECTS_DIR + "/")))
        total = sum(f.size for f in plan.files) + sum(size for _, size in files)
        buckets = min(MAX_BUCKETS, max(2 * int(cpus), -(-total // BUCKET_BYTES)))
        diff = Diff(task=identity["task"], buckets=int(buckets), previous_files=files,
                    id_column=identity["id_column"], id_type=plan.read.id_type,
                    dims=tuple(identity["dims"]), reuse=self.reuse,
                    output_dtype=identity["output_dtype"], seen_files=seen)
        diff = dataclasses.replace(diff, schema=diff_schema(plan.read, diff))
        return build_nightly_dataset(plan, diff)

    def summarize(self, result: dict[str, Any], committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
        counts = {k: sum(u.get(k, 0) for u in committed.values())
                  for k in ("rows_new", "rows_changed", "rows_unchanged", "rows_reused")}
        prev_rows = self.previous.rows if self.previous else 0
        rows_out = result["rows_embedded"]
        model = result["model"]
        return result | counts | {
            "snapshot": self.snapshot,
            "previous_snapshot": self.previous.name if self.previous else None,
            "rows_out": rows_out,  # rows in the snapshot
            # Rows the encoder ran on for this snapshot; the others' vectors were reused.
            "rows_embedded": rows_out - counts["rows_reused"],
            "rows_deleted": prev_rows - counts["rows_changed"] - counts["rows_unchanged"],
            "reused_previous": self.reuse,
            "reembed_reason": self.reason if self.previous else "first snapshot",
            "fingerprints": {"weights": model["weights_fingerprint"],
                             "tokenizer_sha256": self.settings.get("tokenizer_sha256"),
                             "task": result["config"]["task"], "widths": result["widths"]},
        }


def run_nightly(config: RunConfig) -> dict[str, Any]:
    """One nightly run: a new (or the unfinished) snapshot, then ``_LATEST``, then pruning."""
    if config.on_duplicate == "keep-all":
        raise ValueError("nightly keys rows by id, so --on-duplicate keep-all cannot be used")
    if HASH_COLUMN in config.keep_columns:
        raise ValueError(f"--keep-columns names {HASH_COLUMN!r}, the snapshot's own column; "
                         "rename that column")
    root_uri = config.output.rstrip("/")
    found = prepare_output(root_uri, config.storage_options)  # writable; no bucket is created
    if found:
        raise OutputError(f"output {root_uri} holds the output of a `run` (e.g. {found[0]}); "
                          "nightly writes snapshot folders and _LATEST: choose another output")
    fs, root = open_filesystem(root_uri, config.storage_options)
    root = root.rstrip("/")
    latest = read_latest(fs, root)
    snapshots = list_snapshots(fs, root)
    previous = load_previous(fs, root, latest, root_uri) if latest else None
    name = None if config.overwrite else unfinished_snapshot(fs, root, snapshots, latest)
    if name:
        log.info("resuming the unfinished snapshot %s/%s", root_uri, name)
    else:
        name = new_snapshot_name(set(snapshots) | ({latest} if latest else set()))
    try:
        result = _snapshot(config, fs, root, root_uri, name, previous)
    except units.ResumeRefused as err:
        # Today's input or settings differ from the unfinished run's: a scheduled job must
        # not stop there. That snapshot is left alone and deleted by the next pruning.
        log.warning("the unfinished snapshot %s cannot be resumed (%s); starting a new one",
                    name, err)
        name = new_snapshot_name(set(snapshots) | {name} | ({latest} if latest else set()))
        result = _snapshot(config, fs, root, root_uri, name, previous)
    if not result["reconciled"]:
        log.error("snapshot %s does not reconcile; %s still names %s", name, LATEST, latest)
        return result
    publish(fs, root, name)
    gone = prune(fs, root, name, config.keep_snapshots)
    log.info("published %s/%s (%s); deleted %d older snapshot(s)", root_uri, name, LATEST, len(gone))
    return result | {"snapshots_deleted": gone}


def _snapshot(config: RunConfig, fs, root: str, root_uri: str, name: str,
              previous: Previous | None) -> dict[str, Any]:
    """Run into the snapshot folder ``name``. A snapshot that failed or did not reconcile
    loses its ``_summary.json``, so that it is never taken for a complete one (it is resumed
    by the next run, or pruned)."""
    from .runner import RunFailed

    summary = f"{root}/{name}/{SUMMARY_NAME}"
    try:
        result = run(dataclasses.replace(config, output=f"{root_uri}/{name}", overwrite=False),
                     variant=NightlyVariant(previous, name))
    except RunFailed:
        if fs.exists(summary):
            fs.rm(summary)
        raise
    if not result["reconciled"] and fs.exists(summary):
        fs.rm(summary)
    return result
