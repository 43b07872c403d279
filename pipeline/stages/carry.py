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
file's row groups that hold copied files' rows alone, each file in one run of the unit, move
into the new part file as bytes (``pipeline/io/splice.py``); the other copied files are
decoded and written each file's rows together (:func:`copy_plan`).

The copied rows' ids take part in the diff as seen ids (``diff.read_touched``, by
:meth:`MemberCopy.ranges`), as a carried unit's do, so a changed file that repeats one is
rejected; the previous rows of the changed files alone enter the shuffle with their vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
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
from ..io.storage import (CHECKSUM_MOD, DOCUMENTS_DIR, REJECTS_DIR, InputFile,
                          file_rows_checksum, is_side_file, open_filesystem, open_for_publish,
                          storage_errors, to_uri)
from ..io.writers import (add_run, file_row_groups, pair_array, part_name, reason_kind,
                          write_parquet, write_table)

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
    # The previous part files and each one's slices: ((file index, rows), ...) in row order
    # (an (n, 2) array where member_copy made it: 16 bytes a slice on the driver).
    parts: tuple[tuple[str, Any], ...] = dataclasses.field(compare=False)
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
        for index, rows in pairs(dict(self.parts)[name]):
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
    runs = {name: pair_array(slices[name]) for name in parts}
    for name in parts:
        wrong = f"slices {str(slices[name])[:60]} that are not pairs of integers" \
            if runs[name] is None else bad_slice(runs[name], len(unit.members))
        if wrong:
            raise OutputError(f"the previous snapshot's manifest of {unit.unit} has {wrong}; "
                              "the snapshot is damaged: restore it, or delete the output's "
                              "_LATEST to start afresh")
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
        parts=tuple((name, runs[name]) for name in parts),
        rejects=tuple(n for n in manifest["files"] if n.startswith(REJECTS_DIR + "/")),
        counts=tuple((int(rows), int(row_sum)) for _, _, rows, row_sum in described),
        changed=tuple(m for i, m in enumerate(unit.members) if i not in kept))


def bad_slice(runs: np.ndarray, members: int) -> str | None:
    """The first of a part file's slices (an ``(n, 2)`` array of ``[file index, rows]``) that
    is not ``[index of one of the unit's members, rows >= 0]``, described; or None."""
    bad = (runs[:, 0] < 0) | (runs[:, 0] >= members) | (runs[:, 1] < 0)
    return f"a row slice {runs[bad][0].tolist()} that is not one of its {members} files' rows" \
        if bad.any() else None


def pairs(slices: Any) -> list:
    """A part file's slices as Python ``[index, rows]`` pairs (from an array, or as given)."""
    return slices.tolist() if isinstance(slices, np.ndarray) else slices


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

    def split(self, rows: int) -> tuple["_Piece", "_Piece"]:
        """Its first ``rows`` decoded rows, and the rest."""
        head: list[tuple[int, int]] = []
        rest = list(self.runs)
        left = rows
        while left:
            index, n = rest.pop(0)
            if n > left:
                rest.insert(0, (index, n - left))
                n = left
            head.append((index, n))
            left -= n
        return (_Piece(tuple(head), table=self.table.slice(0, rows)),
                _Piece(tuple(rest), table=self.table.slice(rows)))


Spans = list[list[tuple[int, int, int]]]  # a part file's row groups: (file, start, rows) each


def group_spans(slices: tuple[tuple[int, int], ...], groups: list[int], uri: str) -> Spans:
    """The rows of each row group of a previous part file by file: ``(file index, start in
    the row group, rows)``, in order (``slices``: the file's, by its manifest; ``groups``:
    its row groups' rows)."""
    if any(rows < 0 for _, rows in slices):
        raise OutputError(f"{uri}: its manifest's slices count negative rows; the previous "
                          "snapshot is damaged: restore it, or delete the output's _LATEST to "
                          "start afresh")
    check_rows(sum(groups), sum(n for _, n in slices), uri)
    out: Spans = []
    k = used = 0  # the slice at hand, and its rows already placed
    for size in groups:
        spans, at = [], 0
        while at < size:
            index, rows = slices[k]
            n = min(rows - used, size - at)
            if n:
                spans.append((index, at, n))
            at, used = at + n, used + n
            if used == rows:
                k, used = k + 1, 0
        out.append(spans)
    return out


def copy_plan(parts: list[Spans], kept: frozenset[int], small: int | None = None
              ) -> tuple[list[list[bool]], set[int]]:
    """Which row groups of a touched unit's previous part files (``parts``, in order) move as
    bytes, and which copied files are decoded instead (``kept``: the copied files).

    A file's rows must be together in a part file (one run), or its row groups could not
    move without the others' rows: a copied file found in more than one run of the unit
    (rows dealt to several writes by the shuffle, on the night they were embedded) is
    *scattered*. A row group moves as bytes when it holds only copied files' rows, none of a
    scattered file, and at least ``small`` rows (:data:`SMALL_GROUP_ROWS`). A copied file
    with rows in any other row group is decoded, and so is every row group holding its rows:
    a decoded file's rows are written together, so no file is left in two runs."""
    small = SMALL_GROUP_ROWS if small is None else small
    runs: list[list[Any]] = []
    where: dict[int, list[tuple[int, int]]] = {}
    for p, part in enumerate(parts):
        for g, group in enumerate(part):
            for index, _, n in group:
                add_run(runs, index, n)
                where.setdefault(index, []).append((p, g))
    seen = Counter(index for index, _ in runs)
    scattered = {index for index, count in seen.items() if count > 1}
    bad = {(p, g) for p, part in enumerate(parts) for g, group in enumerate(part)
           if sum(n for _, _, n in group) < small
           or any(i not in kept or i in scattered for i, _, _ in group)}
    decoded: set[int] = set()
    todo = list(bad)
    while todo:
        p, g = todo.pop()
        for index, _, _ in parts[p][g]:
            if index in kept and index not in decoded:
                decoded.add(index)
                for other in where[index]:
                    if other not in bad:
                        bad.add(other)
                        todo.append(other)
    return [[(p, g) not in bad for g in range(len(part))] for p, part in enumerate(parts)], \
        decoded


def _chunks(rows: dict[int, int], most: int) -> list[frozenset[int]]:
    """The decoded files (``rows``: each one's rows) in order, cut into sets of at most
    ``most`` rows (a longer file alone)."""
    out: list[frozenset[int]] = []
    current: list[int] = []
    total = 0
    for index in sorted(rows):
        if current and total + rows[index] > most:
            out.append(frozenset(current))
            current, total = [], 0
        current.append(index)
        total += rows[index]
    if current:
        out.append(frozenset(current))
    return out


class _Source:
    """One previous part file read whole: its row groups as bytes, or decoded."""

    def __init__(self, data: bytes, spans: Spans, uri: str) -> None:
        self.uri, self.spans, self._data = uri, spans, data

    @functools.cached_property
    def parsed(self) -> splice.ParquetBytes | None:
        """Its row groups as bytes; None when they cannot move (e.g. another writer's page
        index: they are decoded instead)."""
        try:
            return splice.parse(self._data)
        except splice.SpliceError:
            return None

    @functools.cached_property
    def reader(self) -> pq.ParquetFile:
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(self._data)))

    def group(self, g: int) -> _Piece:
        """Row group ``g`` whole: as bytes (holding only its own), or decoded."""
        runs = tuple((i, n) for i, _, n in self.spans[g])
        if self.parsed is not None:
            return _Piece(runs, group=self.parsed.row_groups[g].detached(),
                          footer=self.parsed.footer)
        return _Piece(runs, table=self.reader.read_row_group(g))

    def rows_of(self, groups: list[int], files: frozenset[int]
                ) -> tuple[pa.Table, np.ndarray] | None:
        """The rows of ``files`` in row groups ``groups`` (in order), decoded, and each one's
        file index (None if none)."""
        groups = [g for g in groups if any(i in files for i, _, _ in self.spans[g])]
        if not groups:
            return None
        spans, ranges, at = [], [], 0
        for g in groups:
            for i, a, n in self.spans[g]:
                if i in files:
                    spans.append((i, n))
                    ranges.append((at + a, n))
            at += sum(n for _, _, n in self.spans[g])
        table = self.reader.read_row_groups(groups)
        if ranges != [(0, at)]:
            table = take_ranges(table, ranges, self.uri, at)
        return table, np.repeat([i for i, _ in spans], [n for _, n in spans])


def _gathered(found: list[tuple[pa.Table, np.ndarray]]) -> _Piece:
    """Decoded rows of several row groups (each with its rows' file indices) as one piece,
    each file's rows together, files in order (a file's rows in the order found)."""
    table = pa.concat_tables([t for t, _ in found])
    index = np.concatenate([i for _, i in found])
    order = np.argsort(index, kind="stable")
    files, counts = np.unique(index, return_counts=True)
    return _Piece(tuple(zip(files.tolist(), counts.tolist())),
                  table=table.take(pa.array(order)))


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
    if all(piece.group is None for piece in pieces):  # nothing moves: written as it is
        write_table(f, pa.concat_tables([p.table for p in pieces]), _file_rows(pieces))
        return
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
    unit's part files do not multiply night after night, and a copy holds about two part
    files' rows in memory); return the write record of those rows.

    The previous part files' row groups that :func:`copy_plan` picks move as bytes, in
    order; the other copied rows are decoded and written after them, each file's rows
    together, files in order. A unit whose files' rows the shuffle dealt to several writes
    (its first night) is thus decoded once, and from then on only the row groups that
    hold changed files' rows (or small ones) are."""
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

    def add(piece: _Piece) -> None:
        nonlocal pending_rows, n_good
        n_good += piece.rows
        for i, n in piece.runs:
            found[i] += n
        if pending and pending_rows + piece.rows > job.rows_per_file:
            flush()
        while piece.table is not None and piece.rows > job.rows_per_file:
            head, piece = piece.split(job.rows_per_file)
            pending.append(head)
            flush()
        pending.append(piece)
        pending_rows += piece.rows

    parts = [(name, pairs(slices)) for name, slices in job.parts
             if job.ranges(name, copied=True)]
    spans = []
    for name, slices in parts:  # their footers alone first: the plan needs every row group
        source_fs, path = open_filesystem(job.uri(name), storage_options)
        with storage_errors(job.uri(name), "copy rows of the previous snapshot's"), \
                source_fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
        spans.append(group_spans(slices, [meta.row_group(g).num_rows
                                          for g in range(meta.num_row_groups)], job.uri(name)))
    moved, decoded = copy_plan(spans, job.kept)
    decoded_rows: Counter = Counter()
    for part in spans:
        for group in part:
            for i, _, n in group:
                if i in decoded:
                    decoded_rows[i] += n
    chunks = _chunks(decoded_rows, job.rows_per_file)

    def read(p: int) -> _Source:
        uri = job.uri(parts[p][0])
        source_fs, path = open_filesystem(uri, storage_options)
        with storage_errors(uri, "copy rows of the previous snapshot's"), \
                source_fs.open(path, "rb") as f:
            return _Source(f.read(), spans[p], uri)

    def gather(p: int, source: _Source, files: frozenset[int], into: list) -> None:
        with storage_errors(source.uri, "copy rows of the previous snapshot's"):
            rows = source.rows_of([g for g in range(len(spans[p])) if not moved[p][g]], files)
        if rows is not None:
            into.append(rows)

    def decodes(p: int, files: frozenset[int]) -> bool:
        """Part ``p`` has rows of ``files`` in row groups that do not move."""
        return any(not moved[p][g] and any(i in files for i, _, _ in group)
                   for g, group in enumerate(spans[p]))

    in_first: list[tuple[pa.Table, np.ndarray]] = []  # the first set's decoded rows
    for p in range(len(parts)):
        if not any(moved[p]) and not (chunks and decodes(p, chunks[0])):
            continue  # read for a later set only
        source = read(p)
        with storage_errors(source.uri, "copy rows of the previous snapshot's"):
            for g in range(len(spans[p])):
                if moved[p][g]:
                    add(source.group(g))
        if chunks:
            gather(p, source, chunks[0], in_first)
        del source
    if in_first:
        add(_gathered(in_first))
        in_first.clear()
    for chunk in chunks[1:]:  # more decoded rows than a part file holds: one set at a time
        found_now: list[tuple[pa.Table, np.ndarray]] = []
        for p in range(len(parts)):
            if decodes(p, chunk):
                gather(p, read(p), chunk, found_now)
        add(_gathered(found_now))
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


def gathering(manifest: dict[str, Any], output_uri: str,
              rows_per_file: int) -> MemberCopy | None:
    """The copy that gathers a unit just written whose rows are in more part files than its
    rows need (``manifest``: the unit as it is about to be committed, in the output folder
    ``output_uri``; ``rows_per_file``: the output's), or None when it needs none.

    A night's shuffle deals a unit's rows to several writes, about one per bucket of the diff
    (two or more per CPU of the cluster), so a unit read whole, e.g. on a first night, would
    otherwise be committed in that many small part files, each of its files' rows in all of
    them. Its part files and rejects are copied into part files of up to ``rows_per_file``
    rows, each file's rows together, as a touched unit's unchanged files are
    (:func:`copy_members`); the files written first are then named by no manifest and deleted
    with the run's other strays. Only units of several files with slices are gathered (not
    ``--long-text chunk`` rows, nor a unit with document vectors)."""
    slices, described = manifest.get("slices"), manifest.get("member_files")
    members = manifest.get("members")
    if not slices or described is None or not members \
            or any(n.startswith(DOCUMENTS_DIR + "/") for n in manifest["files"]):
        return None
    parts = [name for name in manifest["files"] if not is_side_file(name)]
    runs = {name: pair_array(slices.get(name, ())) for name in parts}
    if set(parts) != set(slices) or any(r is None for r in runs.values()):
        return None
    good = sum(int(r[:, 1].sum()) for r in runs.values())
    if len(parts) <= -(-good // rows_per_file) + 1:
        return None
    return MemberCopy(
        unit=manifest["uri"], key=manifest["unit"], source=output_uri, members=tuple(members),
        kept=frozenset(i for i, d in enumerate(described) if int(d[2])),
        parts=tuple((name, runs[name]) for name in parts),
        rejects=tuple(n for n in manifest["files"] if n.startswith(REJECTS_DIR + "/")),
        counts=tuple((int(rows), int(row_sum)) for _, _, rows, row_sum in described),
        changed=(), output_uri=output_uri, rows_per_file=rows_per_file)


def gather_unit(manifest: dict[str, Any], output_uri: str, storage_options: dict[str, Any],
                rows_per_file: int) -> dict[str, Any] | None:
    """``manifest`` with its part files and rejects gathered (:func:`gathering`): its files,
    bytes and slices those of the new files; None when it needs no gathering."""
    job = gathering(manifest, output_uri, rows_per_file)
    if job is None:
        return None
    try:
        record = copy_members(job, storage_options)
    except Exception as err:  # noqa: BLE001 - named with the unit, and what to do
        detail = re.split(r"; the (?:previous )?snapshot is damaged", str(err))[0]
        raise OutputError(
            f"cannot gather the {len(job.parts)} part files of unit {job.unit} in "
            f"{output_uri}: {type(err).__name__}: {detail}; this snapshot is not published: "
            "run the night again (the unit is then done again)") from err
    index = {uri: i for i, uri in enumerate(job.members)}
    return manifest | {
        "files": record["files"], "bytes": record["bytes"],
        "slices": {name: [[index[uri], n] for uri, n in runs]
                   for name, runs in record["slices"].items()},
        "gathered_from": len(job.parts)}


def _check_counts(job: MemberCopy, found: Counter) -> None:
    """Every copied file's rows, good and rejected, are what its manifest counted (the
    files written so far are named by no manifest if not: the run fails and a rerun
    deletes them)."""
    for i in sorted(job.kept):
        if found.get(i, 0) != job.counts[i][0]:
            raise OutputError(
                f"the snapshot {job.source} holds {found.get(i, 0)} row(s) of {job.members[i]}, "
                f"its manifest counts {job.counts[i][0]} (unit {job.unit}); the snapshot is "
                f"damaged: restore it, or delete the output's _LATEST to start afresh")
