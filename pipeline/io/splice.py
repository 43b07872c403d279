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
_FMD_SCHEMA, _FMD_NUM_ROWS, _FMD_ROW_GROUPS = 2, 3, 4
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
    """One row group of a Parquet file held in memory: its bytes and its footer entry."""

    data: memoryview  # the whole file's bytes
    start: int  # where its column chunks begin in ``data``
    size: int  # their bytes, end to end
    rows: int
    entry: _Scanned  # its RowGroup struct in ``data``'s footer
    schema: bytes  # its file's schema, as the footer encodes it (equal ones join)

    def moved_entry(self, to: int, ordinal: int) -> bytes:
        """Its footer entry once its column chunks begin at ``to`` in a new file, as row
        group number ``ordinal``: the old entry's bytes, every offset written anew."""
        shift = to - self.start
        offsets = [self.entry.ints.get(_RG_FILE_OFFSET)]
        for chunk in self.entry.lists[_RG_COLUMNS]:
            meta = chunk.structs[_CC_META].ints
            offsets += [chunk.ints.get(_CC_FILE_OFFSET)] + [meta.get(fid) for fid in _CM_OFFSETS]
        # (start, end, new value) of each integer written anew; an offset of 0 means none.
        patches = [(a, b, value + shift) for value, a, b in filter(None, offsets) if value > 0]
        if _RG_ORDINAL in self.entry.ints:
            patches.append(self.entry.ints[_RG_ORDINAL][1:] + (ordinal,))
        out, at = bytearray(), self.entry.start
        for a, b, value in sorted(patches):
            out += self.data[at:a]
            _put_int(out, value)
            at = b
        out += self.data[at:self.entry.end]
        return bytes(out)


@dataclasses.dataclass(frozen=True, eq=False)
class ParquetBytes:
    """A Parquet file read whole: its footer and row groups, ready to be spliced."""

    data: memoryview
    footer: _Scanned  # its FileMetaData, every top-level field kept
    row_groups: tuple[RowGroup, ...]
    schema: bytes

    def table(self, index: int) -> pa.Table:
        """Row group ``index``, decoded."""
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(self.data))).read_row_group(index)

    def footer_with(self, entries: list[bytes], rows: int) -> bytes:
        """This file's footer with the row groups ``entries`` (RowGroup structs, encoded)
        of ``rows`` rows in all in place of its own."""
        out, last = bytearray(), 0
        for fid, kind, a, b in self.footer.fields:
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
    (schema,) = [bytes(buf[a:b]) for fid, _, a, b in footer.fields if fid == _FMD_SCHEMA]
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
        groups.append(RowGroup(buf, start, end - start, entry.ints[_RG_NUM_ROWS][0], entry,
                               schema))
    return ParquetBytes(buf, footer, tuple(groups), schema)


def write_spliced(f: BinaryIO, groups: list[RowGroup], template: ParquetBytes) -> int:
    """Write a Parquet file of ``groups`` (in order) to ``f``, with ``template``'s footer
    otherwise (schema, key-value metadata, writer); returns the bytes written. Every group's
    file must have ``template``'s schema (checked before anything is written)."""
    if any(group.schema != template.schema for group in groups):
        raise SpliceError("row groups of Parquet files with different schemas")
    entries, pos, rows = [], len(MAGIC), 0
    f.write(MAGIC)
    for i, group in enumerate(groups):
        f.write(group.data[group.start:group.start + group.size])
        entries.append(group.moved_entry(pos, i))
        pos += group.size
        rows += group.rows
    footer = template.footer_with(entries, rows)
    f.write(footer)
    f.write(struct.pack("<I", len(footer)))
    f.write(MAGIC)
    return pos + len(footer) + 8
