"""The nightly job's copy of unchanged files out of a touched unit. No Ray.

A unit of several small files whose files did not all change since the previous snapshot
(a *touched* unit) is not read whole. Its unchanged files' rows are copied out of the
previous snapshot's part files of the same unit, by the row slices its manifest recorded
(the writer puts each file's rows together, ``pipeline/io/writers.py``), with their rejects;
only its changed files are read, hashed, diffed and encoded. :func:`copy_members` writes the
copied rows as part files of today's unit and returns a write record for the driver, which
counts them with the rows the graph writes for the unit's changed files: the unit is
committed once both are out (the reader of the changed files gives the whole unit's row
count and checksum, the copied files' taken from the previous manifest). A previous part
file's row groups that hold copied files' rows alone move into the new part file as bytes
(``pipeline/io/splice.py``); only those that also hold changed files' rows are decoded.

The copied rows' ids take part in the diff as seen ids (``diff.read_touched``, by
:meth:`MemberCopy.ranges`), as a carried unit's do, so a changed file that repeats one is
rejected; the previous rows of the changed files alone enter the shuffle with their vectors.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import splice
from ..io.errors import OutputError
from ..io.readers import Skipped, has_rows
from ..io.splice import Footer, RowGroup
from ..io.storage import (CHECKSUM_MOD, REJECTS_DIR, InputFile, file_rows_checksum,
                          is_side_file, open_filesystem, open_for_publish, storage_errors, to_uri)
from ..io.writers import (add_run, file_row_groups, part_name, reason_kind, write_parquet,
                          write_table)

# A row group of copied rows alone smaller than this is decoded with its neighbours rather
# than moved as bytes, so that files changing night after night do not leave ever smaller
# row groups behind.
SMALL_GROUP_ROWS = 256


@dataclasses.dataclass(frozen=True)
class MemberCopy:
    """One touched unit: which of its files are copied from the previous snapshot, and from
    which of its part files (names relative to the previous snapshot, ``source``)."""

    unit: str  # the unit's name (InputFile.unit)
    key: str  # its key (manifest and part file names)
    source: str  # the previous snapshot's folder URI
    members: tuple[str, ...]  # the unit's files, in order
    kept: frozenset[int]  # indices of the files copied (unchanged since the previous snapshot)
    # The previous part files and each one's slices: ((file index, rows), ...) in row order.
    parts: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    rejects: tuple[str, ...]  # the previous reject files of the unit
    counts: tuple[tuple[int, int], ...]  # each file's rows and row-number sum (all members)
    changed: tuple[InputFile, ...]  # the files read tonight
    output_uri: str = ""
    rows_per_file: int = 1 << 62  # a part file's most rows (the output's)
    bytes: int = 0  # of the previous part files (for scheduling)

    def ranges(self, name: str, copied: bool) -> list[tuple[int, int]]:
        """``(start, rows)`` of one previous part file's rows of the copied files (or, not
        ``copied``, of the changed ones), adjacent ones merged."""
        out: list[tuple[int, int]] = []
        start = 0
        for index, rows in dict(self.parts)[name]:
            if (index in self.kept) == copied and rows:
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + rows)
                else:
                    out.append((start, rows))
            start += rows
        return out

    def uri(self, name: str) -> str:
        return f"{self.source.rstrip('/')}/{name}"

    @property
    def skipped(self) -> Skipped:
        """What the reader of the changed files adds to the unit's row count and checksum."""
        rows = checksum = 0
        for i in sorted(self.kept):
            n, row_sum = self.counts[i]
            rows += n
            checksum = (checksum + file_rows_checksum(self.members[i], n, row_sum)) % CHECKSUM_MOD
        return Skipped(frozenset(self.members[i] for i in self.kept), rows, checksum)


def member_copy(unit: InputFile, manifest: dict[str, Any], source: str) -> MemberCopy | None:
    """The copy of ``unit``'s unchanged files from its previous ``manifest`` (in the snapshot
    folder ``source``), or None when nothing can be copied: the unit is not a group of files,
    its files are not the manifest's, the manifest has no slices (written before they were
    recorded, or with ``--long-text chunk``) or counts a duplicate-id reject (the file it lost
    to may have changed), or none, or all, of its files are unchanged (a unit whose files are
    all unchanged is carried whole). A file is unchanged when its size and store version
    equal the manifest's (a file without a version is never trusted); an unchanged file
    without a row is read, not copied."""
    described = manifest.get("member_files")
    slices = manifest.get("slices")
    if not unit.members or described is None or slices is None \
            or manifest.get("members") != [m.uri for m in unit.members] \
            or len(described) != len(unit.members) \
            or any(reason == "duplicate id" for reason in manifest.get("reject_reasons", {})):
        return None
    parts = [name for name in manifest["files"] if not is_side_file(name)]
    if set(parts) != set(slices):
        return None
    kept = frozenset(i for i, (m, (size, version, _, _)) in enumerate(zip(unit.members, described))
                     if m.version and version == m.version and size == m.size)
    # Nothing is copied from files that hold no row: the unit's count would then be its
    # changed files' alone, its rows could commit it before the copy's record came, and that
    # record would arrive after the commit. (An empty file costs nothing to read.)
    kept = frozenset(i for i in kept if int(described[i][2]))
    if not kept or len(kept) == len(unit.members):
        return None
    return MemberCopy(
        unit=unit.unit, key=manifest["unit"], source=source,
        members=tuple(m.uri for m in unit.members), kept=kept,
        parts=tuple((name, tuple((int(i), int(n)) for i, n in slices[name])) for name in parts),
        rejects=tuple(n for n in manifest["files"] if n.startswith(REJECTS_DIR + "/")),
        counts=tuple((int(rows), int(row_sum)) for _, _, rows, row_sum in described),
        changed=tuple(m for i, m in enumerate(unit.members) if i not in kept))


def check_rows(found: int, rows: int, uri: str) -> None:
    """A previous part file (``uri``) holds the ``rows`` its manifest's slices count."""
    if found != rows:
        raise OutputError(f"{uri} has {found} rows, its manifest's slices {rows}; the "
                          "previous snapshot is damaged: restore it, or delete the output's "
                          "_LATEST to start afresh")


def take_ranges(table: pa.Table, ranges: Iterable[tuple[int, int]], uri: str,
                rows: int) -> pa.Table:
    """The rows of ``table`` (a previous part file's, ``uri``, of ``rows`` rows by its
    manifest's slices) in ``ranges`` (``(start, rows)``), in order."""
    check_rows(table.num_rows, rows, uri)
    ranges = list(ranges)
    if not ranges:
        return table.slice(0, 0)
    index = np.concatenate([np.arange(start, start + n) for start, n in ranges])
    return table.take(pa.array(index))


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Copied rows of one previous part file: a row group moved as bytes (``group``), or
    rows decoded (``table``); ``runs`` are their files' ``(index, rows)`` in row order."""

    runs: tuple[tuple[int, int], ...]
    group: RowGroup | None = None
    footer: Footer | None = None  # the group's file's
    table: pa.Table | None = None

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.runs)


def _kept_runs(slices: tuple[tuple[int, int], ...], kept: frozenset[int], start: int,
               stop: int, first: int = 0, at: int = 0
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The runs ``(file index, rows)`` of the copied files among rows ``[start, stop)`` of
    a part file whose slices are ``slices``, and their ``(start, rows)`` ranges relative to
    ``start``. The scan begins at slice ``first``, which begins at row ``at``."""
    out: list[tuple[int, int]] = []
    ranges: list[tuple[int, int]] = []
    for index, rows in slices[first:]:
        if at >= stop:
            break
        a, b = max(at, start), min(at + rows, stop)
        if a < b and index in kept:
            out.append((index, b - a))
            if ranges and sum(ranges[-1]) == a - start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + b - a)
            else:
                ranges.append((a - start, b - a))
        at += rows
    return out, ranges


def copied_pieces(data: bytes, slices: tuple[tuple[int, int], ...], kept: frozenset[int],
                  uri: str) -> list[_Piece]:
    """The copied files' rows of one previous part file (its bytes ``data``, its manifest's
    ``slices``), in order: each row group that holds only their rows as bytes, the rows of a
    row group that also holds changed ones decoded (and a file that cannot be spliced,
    ``pipeline/io/splice.py``, decoded whole)."""
    rows = sum(n for _, n in slices)
    try:
        parsed = splice.parse(data)
    except splice.SpliceError:
        parsed = None
    if parsed is None:
        table = pq.read_table(pa.BufferReader(data))
        runs, ranges = _kept_runs(slices, kept, 0, rows)
        return [_Piece(tuple(runs), table=take_ranges(table, ranges, uri, rows))]
    check_rows(sum(g.rows for g in parsed.row_groups), rows, uri)
    pieces, start = [], 0
    first, at = 0, 0  # the first slice that reaches this row group, and where it begins
    for i, group in enumerate(parsed.row_groups):
        while first < len(slices) and at + slices[first][1] <= start:
            at += slices[first][1]
            first += 1
        runs, ranges = _kept_runs(slices, kept, start, start + group.rows, first, at)
        if ranges == [(0, group.rows)] and group.rows >= SMALL_GROUP_ROWS:
            # Its own bytes: the pieces waiting to be written do not hold whole files.
            pieces.append(_Piece(tuple(runs), group=group.detached(), footer=parsed.footer))
        elif ranges:
            pieces.append(_Piece(tuple(runs), table=take_ranges(parsed.table(i), ranges, uri,
                                                                 group.rows)))
        start += group.rows
    return pieces


def _file_rows(pieces: list[_Piece]) -> list[int]:
    """The row groups of ``pieces``' rows written again (a file's runs in adjacent pieces
    joined: a row group ends with a file's rows)."""
    runs: list[list[Any]] = []
    for piece in pieces:
        for i, n in piece.runs:
            add_run(runs, i, n)
    return file_row_groups([n for _, n in runs])


def write_pieces(f, pieces: list[_Piece]) -> None:
    """A Parquet file of ``pieces``' rows in order into the open file ``f``: row groups moved
    as bytes, each run of decoded rows written as row groups that end with a file's rows.
    When the pieces' files differ in their Parquet schemas or writers (one Arrow schema
    written by another pyarrow, say), every piece is decoded and written again."""
    groups: list[RowGroup] = []
    template: Footer | None = None
    decoded: list[_Piece] = []

    def encode() -> None:
        nonlocal template
        buffer = io.BytesIO()
        write_table(buffer, pa.concat_tables([p.table for p in decoded]),
                    _file_rows(decoded))
        parsed = splice.parse(buffer.getvalue())
        template = template or parsed.footer
        groups.extend(parsed.row_groups)
        decoded.clear()

    for piece in pieces:
        if piece.group is None:
            decoded.append(piece)
            continue
        if decoded:
            encode()
        template = template or piece.footer
        groups.append(piece.group)
    if decoded:
        encode()
    try:
        splice.write_spliced(f, groups, template)  # checks the schemas before it writes
    except splice.SpliceError:
        tables = [p.table if p.group is None else p.group.table(p.footer) for p in pieces]
        write_table(f, pa.concat_tables(tables), _file_rows(pieces))


def copy_members(job: MemberCopy, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Copy the unchanged files' rows (and rejects) of ``job``'s unit into part files of
    today's unit under ``job.output_uri``, of up to ``job.rows_per_file`` rows each (so a
    unit's part files do not multiply night after night, and a copy holds about one part
    file's rows in memory); return the write record of those rows. Row groups of copied
    files alone move as bytes (:func:`copied_pieces`)."""
    t0 = time.perf_counter()
    fs, base = open_filesystem(job.output_uri, storage_options)
    base = base.rstrip("/")
    files, size, slices_out, n_good = [], 0, {}, 0
    found: Counter = Counter()  # rows copied per file index, good and rejected
    pending: list[_Piece] = []  # pieces not written yet
    pending_rows = 0

    def flush() -> None:
        nonlocal size, pending, pending_rows
        out = part_name(job.key)
        path = f"{base}/{out}"
        with storage_errors(to_uri(fs, path), "write"):
            with open_for_publish(fs, path) as f:
                write_pieces(f, pending)
            size += int(fs.size(path))
        files.append(out)
        slices_out[out] = []
        for piece in pending:
            for i, n in piece.runs:
                add_run(slices_out[out], job.members[i], n)
        pending, pending_rows = [], 0

    for name, slices in job.parts:
        if not job.ranges(name, copied=True):
            continue
        source_fs, path = open_filesystem(job.uri(name), storage_options)
        with storage_errors(job.uri(name), "copy rows of the previous snapshot's"):
            with source_fs.open(path, "rb") as f:
                data = f.read()
            pieces = copied_pieces(data, slices, job.kept, job.uri(name))
        del data
        for piece in pieces:
            if pending and pending_rows + piece.rows > job.rows_per_file:
                flush()
            pending.append(piece)
            pending_rows += piece.rows
            n_good += piece.rows
            for i, n in piece.runs:
                found[i] += n
    if pending:
        flush()
    bad = []
    copied = pa.array(sorted(job.members[i] for i in job.kept), pa.string())
    for name in job.rejects:
        source_fs, path = open_filesystem(job.uri(name), storage_options)
        with storage_errors(job.uri(name), "copy rejects of the previous snapshot's"), \
                source_fs.open(path, "rb") as f:
            table = pq.read_table(f)
        table = table.filter(pc.is_in(table["source"], copied))
        if table.num_rows:
            bad.append(table)
    bad_rows = pa.concat_tables(bad) if bad else None
    first = None
    if bad_rows is not None:
        index = {uri: i for i, uri in enumerate(job.members)}
        found.update(index[uri] for uri in bad_rows["source"].to_pylist())
        name = f"{REJECTS_DIR}/{part_name(job.key)}"
        size += write_parquet(fs, f"{base}/{name}", bad_rows)
        files.append(name)
        first = [bad_rows["row"][0].as_py(), bad_rows["reason"][0].as_py()]
    _check_counts(job, found)
    skipped = job.skipped
    n_bad = bad_rows.num_rows if bad_rows is not None else 0
    # The unit's own count comes with the changed files' last rows; when they hold no row
    # at all, none will come, so this record gives it (the unit is then these rows alone).
    empty = not any(has_rows(m, storage_options) for m in job.changed)
    reasons = Counter(reason_kind(r) for r in bad_rows["reason"].to_pylist()) \
        if bad_rows is not None else Counter()
    return {
        "unit": job.key, "source": job.unit, "files": files, "bytes": size,
        "rows": skipped.rows, "row_sum": skipped.checksum,
        "file_rows": skipped.rows if empty else -1,
        "file_rowsum": skipped.checksum if empty else -1,
        "rows_embedded": n_good, "rows_rejected": n_bad, "first_reject": first,
        "reject_reasons": dict(reasons),
        "rows_new": 0, "rows_changed": 0, "rows_unchanged": n_good, "rows_reused": n_good,
        "slices": slices_out,
        "member_rows": {job.members[i]: list(job.counts[i]) for i in sorted(job.kept)},
        "write_s": time.perf_counter() - t0,
    }


def _check_counts(job: MemberCopy, found: Counter) -> None:
    """Every copied file's rows, good and rejected, are what its manifest counted (the
    files written so far are named by no manifest if not: the run fails and a rerun
    deletes them)."""
    for i in sorted(job.kept):
        if found.get(i, 0) != job.counts[i][0]:
            raise OutputError(
                f"the previous snapshot holds {found.get(i, 0)} row(s) of {job.members[i]}, "
                f"its manifest counts {job.counts[i][0]} (unit {job.unit}); the snapshot is "
                f"damaged: restore it, or delete the output's _LATEST to start afresh")
