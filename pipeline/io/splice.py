"""Parquet files made of other Parquet files' row groups, copied as bytes. No Ray.

A Parquet file is ``PAR1``, its row groups' column chunks (pages, each self-describing),
then a footer (Thrift compact protocol) that gives every chunk's offset in the file, then
the footer's length and ``PAR1``. A row group can therefore move to another file unchanged,
as bytes, once its footer entry is rewritten with the new offsets: nothing is decoded or
encoded. The nightly job copies a touched unit's unchanged rows this way
(``pipeline/stages/carry.py``): whole row groups as bytes, and only the row groups that also
hold changed rows decoded and written again.

Only files as this project writes them are spliced: no encryption, no page index, no bloom
filter, column chunks laid end to end, and every piece of one output with the same schema.
:func:`parse` raises :class:`SpliceError` for any other file, which the caller then reads
and writes again.

The footer is not decoded into objects: a scan walks its Thrift fields, notes where each
offset's value lies, and skips the rest (statistics, encodings, fields a newer writer adds),
which pass through as the bytes they were. A moved row group's footer entry is its old
entry's bytes with the offsets' values written anew.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
from typing import BinaryIO, Union

import pyarrow as pa
import pyarrow.parquet as pq

MAGIC = b"PAR1"

# Thrift compact protocol types.
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = 1, 2, 3, 4, 5, 6, 7, 8
_LIST, _SET, _MAP, _STRUCT = 9, 10, 11, 12
_INTS = (_I16, _I32, _I64)

# Field ids of the Parquet footer (parquet.thrift) that name offsets or what moves with them.
_FMD_SCHEMA, _FMD_NUM_ROWS, _FMD_ROW_GROUPS, _FMD_CREATED_BY = 2, 3, 4, 6
_FMD_ENCRYPTION = (8, 9)  # encryption_algorithm, footer_signing_key_metadata
_RG_COLUMNS, _RG_NUM_ROWS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 3, 5, 7
_CC_FILE_PATH, _CC_FILE_OFFSET, _CC_META = 1, 2, 3
_CC_NOT_MOVABLE = (4, 5, 6, 7, 8, 9)  # page index offsets and lengths, encryption
_CM_COMPRESSED, _CM_DATA_PAGE, _CM_INDEX_PAGE, _CM_DICTIONARY_PAGE = 7, 9, 10, 11
_CM_OFFSETS = (_CM_DATA_PAGE, _CM_INDEX_PAGE, _CM_DICTIONARY_PAGE)
_CM_NOT_MOVABLE = (14, 15)  # bloom filter offset and length


class SpliceError(ValueError):
    """A file that cannot give its row groups as bytes, or pieces that do not fit together."""


# --- A scan of Thrift compact structs ---

_INT = "int"  # a scan spec's mark: note this integer field's value and where it lies
Spec = dict[int, Union[str, "Spec", tuple[str, "Spec"]]]


@dataclasses.dataclass
class _Scanned:
    """One struct as scanned: where it lies, which fields it has, the integers, structs and
    lists of structs its spec asked for, and (``keep``) every field's kind and value bytes."""

    start: int
    end: int = 0
    present: set[int] = dataclasses.field(default_factory=set)
    ints: dict[int, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # v, a, b
    structs: dict[int, "_Scanned"] = dataclasses.field(default_factory=dict)
    lists: dict[int, list["_Scanned"]] = dataclasses.field(default_factory=dict)
    fields: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _list_head(buf: memoryview, pos: int) -> tuple[int, int, int]:
    head = buf[pos]
    size, elem = head >> 4, head & 0x0F
    if size == 15:
        size, pos = _varint(buf, pos + 1)
        return size, elem, pos
    return size, elem, pos + 1


def _skip(buf: memoryview, pos: int, kind: int) -> int:
    """Where the value of ``kind`` at ``pos`` ends."""
    if kind in (_TRUE, _FALSE, _BYTE):  # a bool takes a byte only inside a list or set
        return pos + 1
    if kind in _INTS:
        while buf[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind == _DOUBLE:
        return pos + 8
    if kind == _BINARY:
        n, pos = _varint(buf, pos)
        return pos + n
    if kind in (_LIST, _SET):
        size, elem, pos = _list_head(buf, pos)
        for _ in range(size):
            pos = _skip(buf, pos, elem)
        return pos
    if kind == _MAP:
        size, pos = _varint(buf, pos)
        if size:
            head = buf[pos]
            pos += 1
            for _ in range(size):
                pos = _skip(buf, _skip(buf, pos, head >> 4), head & 0x0F)
        return pos
    if kind == _STRUCT:
        while True:
            head = buf[pos]
            pos += 1
            if head == 0:
                return pos
            if not head >> 4:  # a field id of its own
                pos = _skip(buf, pos, _I16)
            if head & 0x0F not in (_TRUE, _FALSE):
                pos = _skip(buf, pos, head & 0x0F)
    raise SpliceError(f"unknown Thrift type {kind} in a Parquet footer")


def _scan(buf: memoryview, pos: int, spec: Spec, keep: bool = False) -> _Scanned:
    """Walk the struct at ``pos``, noting what ``spec`` asks for (see :class:`_Scanned`)."""
    out = _Scanned(pos)
    last = 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            out.end = pos
            return out
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid = last + delta
        else:
            n, pos = _varint(buf, pos)
            fid = _unzigzag(n)
        last = fid
        out.present.add(fid)
        start, want = pos, spec.get(fid)
        if kind in (_TRUE, _FALSE):  # the value is the kind
            pass
        elif want is _INT and kind in _INTS:
            n, pos = _varint(buf, pos)
            out.ints[fid] = (_unzigzag(n), start, pos)
        elif isinstance(want, dict) and kind == _STRUCT:
            out.structs[fid] = _scan(buf, pos, want)
            pos = out.structs[fid].end
        elif isinstance(want, tuple) and kind == _LIST:
            size, elem, pos = _list_head(buf, pos)
            if elem != _STRUCT:
                raise SpliceError(f"a Parquet footer list of type {elem}, not of structs")
            items = out.lists[fid] = []
            for _ in range(size):
                items.append(_scan(buf, pos, want[1]))
                pos = items[-1].end
        else:
            pos = _skip(buf, pos, kind)
        if keep:
            out.fields.append((fid, kind, start, pos))


_CM_SPEC: Spec = {_CM_COMPRESSED: _INT, _CM_DATA_PAGE: _INT, _CM_INDEX_PAGE: _INT,
                  _CM_DICTIONARY_PAGE: _INT}
_CC_SPEC: Spec = {_CC_FILE_OFFSET: _INT, _CC_META: _CM_SPEC}
_RG_SPEC: Spec = {_RG_COLUMNS: ("list", _CC_SPEC), _RG_NUM_ROWS: _INT, _RG_FILE_OFFSET: _INT,
                  _RG_ORDINAL: _INT}
_FMD_SPEC: Spec = {_FMD_NUM_ROWS: _INT, _FMD_ROW_GROUPS: ("list", _RG_SPEC)}


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_int(out: bytearray, value: int) -> None:
    _put_varint(out, (value << 1) ^ (value >> 63))  # zigzag


def _put_header(out: bytearray, fid: int, last: int, kind: int) -> None:
    if 0 < fid - last <= 15:
        out.append(((fid - last) << 4) | kind)
    else:
        out.append(kind)
        _put_int(out, fid)


def _put_list_head(out: bytearray, size: int, elem: int) -> None:
    if size < 15:
        out.append((size << 4) | elem)
    else:
        out.append(0xF0 | elem)
        _put_varint(out, size)


# --- Row groups as bytes ---

@dataclasses.dataclass(frozen=True, eq=False)
class RowGroup:
    """One row group of a Parquet file: its column chunks' bytes and its footer entry."""

    data: memoryview  # bytes that hold its column chunks (its file's, or its own)
    at: int  # where its column chunks begin in ``data``
    origin: int  # where they began in their file (the offsets in ``entry`` are its file's)
    size: int  # their bytes, end to end
    rows: int
    entry: bytes  # its RowGroup struct as its file's footer encodes it
    # (start, end, value) in ``entry`` of each offset (value > 0) to move with it, and the
    # (start, end) of its ordinal, if it has one.
    offsets: tuple[tuple[int, int, int], ...]
    ordinal: tuple[int, int] | None
    key: bytes  # its file's schema and writer: row groups of equal keys join

    def detached(self) -> "RowGroup":
        """The same row group holding a copy of its own bytes only (not its whole file's)."""
        own = memoryview(bytes(self.data[self.at:self.at + self.size]))
        return dataclasses.replace(self, data=own, at=0)

    def moved_entry(self, to: int, ordinal: int) -> bytes:
        """Its footer entry once its column chunks begin at ``to`` in a new file, as row
        group number ``ordinal``: the old entry's bytes, every offset written anew."""
        shift = to - self.origin
        patches = [(a, b, value + shift) for a, b, value in self.offsets]
        if self.ordinal is not None:
            patches.append(self.ordinal + (ordinal,))
        out, at = bytearray(), 0
        for a, b, value in sorted(patches):
            out += self.entry[at:a]
            _put_int(out, value)
            at = b
        out += self.entry[at:]
        return bytes(out)

    def chunks(self) -> memoryview:
        return self.data[self.at:self.at + self.size]

    def table(self, footer: "Footer") -> pa.Table:
        """Its rows, decoded (``footer``: its file's)."""
        buffer = io.BytesIO()
        write_spliced(buffer, [self], footer)
        return pq.read_table(pa.BufferReader(buffer.getvalue()))


def _row_group(buf: memoryview, entry: _Scanned, start: int, size: int, key: bytes) -> RowGroup:
    offsets = [entry.ints.get(_RG_FILE_OFFSET)]
    for chunk in entry.lists[_RG_COLUMNS]:
        meta = chunk.structs[_CC_META].ints
        offsets += [chunk.ints.get(_CC_FILE_OFFSET)] + [meta.get(fid) for fid in _CM_OFFSETS]
    base = entry.start  # positions relative to the entry's bytes; an offset of 0 means none
    moved = tuple((a - base, b - base, value) for value, a, b in filter(None, offsets)
                  if value > 0)
    ordinal = entry.ints.get(_RG_ORDINAL)
    return RowGroup(buf, start, start, size, entry.ints[_RG_NUM_ROWS][0],
                    bytes(buf[entry.start:entry.end]), moved,
                    (ordinal[1] - base, ordinal[2] - base) if ordinal else None, key)


@dataclasses.dataclass(frozen=True, eq=False)
class Footer:
    """A Parquet file's footer, apart from its file: what a new file of moved row groups
    takes from it (schema, key-value metadata, writer)."""

    data: bytes  # the footer's bytes
    fields: tuple[tuple[int, int, int, int], ...]  # its fields: (id, kind, start, end) in data
    key: bytes  # its schema and writer (:attr:`RowGroup.key`)

    def with_row_groups(self, entries: list[bytes], rows: int) -> bytes:
        """This footer with the row groups ``entries`` (RowGroup structs, encoded) of
        ``rows`` rows in all in place of its own."""
        out, last = bytearray(), 0
        for fid, kind, a, b in self.fields:
            _put_header(out, fid, last, kind)
            if fid == _FMD_NUM_ROWS:
                _put_int(out, rows)
            elif fid == _FMD_ROW_GROUPS:
                _put_list_head(out, len(entries), _STRUCT)
                for entry in entries:
                    out += entry
            else:
                out += self.data[a:b]
            last = fid
        out.append(0)
        return bytes(out)


@dataclasses.dataclass(frozen=True, eq=False)
class ParquetBytes:
    """A Parquet file read whole: its footer and row groups, ready to be spliced."""

    data: memoryview
    footer: Footer
    row_groups: tuple[RowGroup, ...]

    def table(self, index: int) -> pa.Table:
        """Row group ``index``, decoded."""
        return self._reader.read_row_group(index)

    @functools.cached_property
    def _reader(self) -> pq.ParquetFile:
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(self.data)))


def footer_span(buf: memoryview) -> tuple[int, int]:
    """Where the footer of the Parquet file ``buf`` begins and ends."""
    if len(buf) < 12 or bytes(buf[:4]) != MAGIC or bytes(buf[-4:]) != MAGIC:
        raise SpliceError("not a Parquet file (no PAR1 at its start and end)")
    length = struct.unpack_from("<I", buf, len(buf) - 8)[0]
    start = len(buf) - 8 - length
    if start < 4:
        raise SpliceError("a Parquet footer longer than its file")
    return start, len(buf) - 8


def parse(data: bytes | memoryview) -> ParquetBytes:
    """The row groups of the Parquet file ``data``; :class:`SpliceError` if it is not one
    whose row groups move as bytes (see the module's note)."""
    buf = memoryview(data)
    start, end = footer_span(buf)
    try:
        footer = _scan(buf, start, _FMD_SPEC, keep=True)
    except (IndexError, RecursionError) as e:
        raise SpliceError(f"a Parquet footer that cannot be read ({type(e).__name__})") from e
    if footer.end != end:
        raise SpliceError("a Parquet footer whose length is not what it says")
    try:
        return _row_groups(buf, footer)
    except KeyError as e:
        raise SpliceError(f"a Parquet footer without field {e} where it needs one") from e


def _row_groups(buf: memoryview, footer: _Scanned) -> ParquetBytes:
    if any(fid in footer.present for fid in _FMD_ENCRYPTION):
        raise SpliceError("an encrypted Parquet file")
    if _FMD_NUM_ROWS not in footer.ints or _FMD_ROW_GROUPS not in footer.lists:
        raise SpliceError("a Parquet footer without its row count or row groups")
    schema = [bytes(buf[a:b]) for fid, _, a, b in footer.fields if fid == _FMD_SCHEMA]
    if len(schema) != 1:
        raise SpliceError("a Parquet footer without its schema")
    # The schema and the writer's name (readers work around a writer's known bugs by it).
    key = schema[0] + b"".join(bytes(buf[a:b]) for fid, _, a, b in footer.fields
                               if fid == _FMD_CREATED_BY)
    groups = []
    for entry in footer.lists[_FMD_ROW_GROUPS]:
        spans = []
        for chunk in entry.lists[_RG_COLUMNS]:
            if chunk.present.intersection(_CC_NOT_MOVABLE) or _CC_FILE_PATH in chunk.present:
                raise SpliceError("a Parquet column chunk with a page index, encryption or "
                                  "data in another file")
            meta = chunk.structs[_CC_META]
            if meta.present.intersection(_CM_NOT_MOVABLE):
                raise SpliceError("a Parquet column chunk with a bloom filter")
            first = meta.ints[_CM_DATA_PAGE][0]
            for fid in (_CM_DICTIONARY_PAGE, _CM_INDEX_PAGE):
                if fid in meta.ints and meta.ints[fid][0] > 0:
                    first = min(first, meta.ints[fid][0])
            spans.append((first, first + meta.ints[_CM_COMPRESSED][0]))
        spans.sort()
        if not spans:
            raise SpliceError("a Parquet row group without columns")
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise SpliceError("a Parquet row group whose column chunks are not end to end")
        start, end = spans[0][0], spans[-1][1]
        if start < len(MAGIC) or end > footer.start:
            raise SpliceError("a Parquet row group outside its file's data")
        groups.append(_row_group(buf, entry, start, end - start, key))
    fields = tuple((fid, kind, a - footer.start, b - footer.start)
                   for fid, kind, a, b in footer.fields)
    return ParquetBytes(buf, Footer(bytes(buf[footer.start:footer.end]), fields, key),
                        tuple(groups))


def write_spliced(f: BinaryIO, groups: list[RowGroup], template: Footer) -> int:
    """Write a Parquet file of ``groups`` (in order) to ``f``, with ``template``'s schema,
    key-value metadata and writer; returns the bytes written. Every group's file must have
    ``template``'s schema and writer (checked before anything is written)."""
    if any(group.key != template.key for group in groups):
        raise SpliceError("row groups of Parquet files with different schemas or writers")
    entries, pos, rows = [], len(MAGIC), 0
    f.write(MAGIC)
    for i, group in enumerate(groups):
        f.write(group.chunks())
        entries.append(group.moved_entry(pos, i))
        pos += group.size
        rows += group.rows
    footer = template.with_row_groups(entries, rows)
    f.write(footer)
    f.write(struct.pack("<I", len(footer)))
    f.write(MAGIC)
    return pos + len(footer) + 8
