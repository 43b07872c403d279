"""Units of work, their commits, and resuming a run. Pure Python over fsspec, no Ray.

A unit is one input file, or a slice of whole row groups of a Parquet file larger than
``--unit-bytes``. Every output file holds the rows of one unit only
(``part-<unit>-<random>.parquet``, and the same under ``_rejects/``), so a unit is done when
all of its rows are in files: the driver counts each unit's rows as the write tasks report
them, and when the count and the sum of row numbers equal the file's own (``__file_rows``,
``__file_rowsum``), it commits the unit by writing ``_manifest/unit-<unit>.json`` (one atomic
PUT) naming the unit's files. Files that no manifest names are not part of the output: a
rerun deletes them before it starts (they are what a killed run or a retried task left) and
re-embeds the units that were not committed.

Ray Data's own checkpointing (``DataContext.checkpoint_config``) was considered: it records
every written row id and, on restore, loads all of them into memory (a sorted array) to
filter the input row by row, still reading every file. Per-unit manifests cost memory and
requests per file, not per row, and skip committed files without reading them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import posixpath
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa

from .io.readers import JSON_TEXT
from .io.storage import (CHECKSUM_MOD, MANIFEST_DIR, SUMMARY_NAME, InputFile, OutputError,
                         group_version, is_local, publish_json, relative, storage_errors, to_uri,
                         unit_key)
from .io.writers import pair_array

log = logging.getLogger("pipeline.units")

RUN_FILE = "_run.json"
# Settings that change what a row's output is; a resumed run must match them all.
IDENTITY_FIELDS = ("model_fingerprint", "tokenizer_sha256", "task", "dims", "output_dtype",
                   "dtype", "id_column", "text_column", "keep_columns", "on_duplicate",
                   "long_text")


def unit_manifest_name(key: str) -> str:
    return f"{MANIFEST_DIR}/unit-{key}.json"


class ResumeRefused(OutputError):
    """The output holds a run this one cannot continue (other settings or inputs)."""


class RowsDuplicated(RuntimeError):
    """A unit reported more rows than its file holds: a row would be written twice."""


@dataclasses.dataclass
class OutputState:
    """What an output location holds: an earlier run's identity and committed units."""

    path: str  # the output path within ``fs``
    identity: dict[str, Any] | None
    units: dict[str, dict[str, Any]]  # unit key -> its manifest
    files: list[str]  # every file of ours found there (paths within ``fs``)
    local: bool = False  # on a local disk (symbolic links in the path are resolved)

    @property
    def empty(self) -> bool:
        return not self.files

    def name(self, path: str) -> str:
        """A found file's name relative to the output (as manifests name files)."""
        return relative(path, self.path, self.local)


def load_state(fs, path: str, files: list[str]) -> OutputState:
    """Read the run identity and the unit manifests among ``files`` (an output's own files)."""
    state = OutputState(path, None, {}, files, is_local(fs))
    names = {state.name(f): f for f in files}
    manifests = [f for n, f in names.items()
                 if n.startswith(f"{MANIFEST_DIR}/unit-") and n.endswith(".json")]
    identity, units = None, {}
    with storage_errors(to_uri(fs, path), "read the manifests of"):
        run_file = names.get(f"{MANIFEST_DIR}/{RUN_FILE}")
        if run_file:
            identity = json.loads(fs.cat_file(run_file))["identity"]
        # One batched request set (s3fs fetches the list concurrently).
        contents = fs.cat(manifests) if manifests else {}
    if len(manifests) == 1 and not isinstance(contents, dict):
        contents = {manifests[0]: contents}
    for data in contents.values():
        manifest = json.loads(data)
        if "slices" in manifest:
            manifest["slices"] = packed_slices(manifest["slices"])
        units[manifest["unit"]] = manifest
    state.identity, state.units = identity, units
    return state


def packed_slices(slices: Any) -> Any:
    """A unit manifest's part files' slices as the driver holds them: per part file, an
    ``(n, 2)`` int64 array of ``[file index, rows]``, 16 bytes a slice. As loaded from JSON a
    slice is a list of two ints, ~100 bytes; a night's shuffle deals a unit's rows over
    several part files, so their slices grow with rows, and a snapshot of 100,000 small files
    and 10M rows held ~0.1 GiB of them. Slices that are not such pairs of int64 are returned
    as they are (``pipeline/stages/carry.py::member_copy`` refuses them as damaged).
    :func:`storage.publish_json` writes the arrays back as lists."""
    if not isinstance(slices, dict):
        return slices
    packed = {}
    for name, runs in slices.items():
        array = pair_array(runs)
        if array is None:
            return slices
        packed[name] = array
    return packed


# Small files are grouped into units of several once the input has many: the per-unit costs
# (a manifest, part files, a write record, the driver's bookkeeping) are then paid per group,
# not per tiny file. A listing of n small files gets n // GROUPED_UNITS files a unit (so at
# least GROUPED_UNITS units, read in parallel), at most GROUP_FILES files and GROUP_BYTES
# (or --unit-bytes) a unit; an input of fewer than 2 * GROUPED_UNITS files keeps one unit
# per file (the finest resume).
GROUPED_UNITS = 64
GROUP_FILES = 256
GROUP_BYTES = 64 << 20


def group_units(files: list[InputFile], unit_bytes: int,
                committed: Mapping[str, Mapping[str, Any]] = {}) -> list[InputFile]:
    """The run's units from the listed ``files`` (sorted; large Parquet files already split
    into row-group slices): runs of consecutive small files become one unit each, of
    ``len(files) // GROUPED_UNITS`` files, at most :data:`GROUP_FILES` files and
    ``min(unit_bytes, GROUP_BYTES)`` bytes.

    ``committed`` (an earlier run's manifests at the output) wins over the grouping: a unit
    it holds is planned again with the same files when they are all still listed (a file
    changed since is then found by :func:`resumable_units` and the unit embedded again),
    and a file committed alone stays alone. So a resume plans the units it keeps whatever was
    added to the input since, and the rest is grouped afresh (its earlier files are strays).
    """
    by_uri = {f.uri: f for f in files if f.row_groups is None}
    claimed, out = set(), []
    for manifest in committed.values():
        members = manifest.get("members") or []
        if members and all(u in by_uri for u in members) and not claimed & set(members):
            out.append(_group([by_uri[u] for u in members]))
            claimed.update(members)
    limit = min(unit_bytes, GROUP_BYTES)
    per_unit = min(GROUP_FILES, max(1, len(files) // GROUPED_UNITS))
    run: list[InputFile] = []
    size = 0
    for f in files:
        if f.uri in claimed and f.row_groups is None:
            continue
        alone = f.row_groups is not None or f.size >= limit \
            or bool(committed) and unit_key(f.unit) in committed  # (a hash a file)
        if run and (alone or len(run) >= per_unit or size + f.size > limit):
            out.append(_group(run))
            run, size = [], 0
        if alone:
            out.append(f)
        else:
            run.append(f)
            size += f.size
    if run:
        out.append(_group(run))
    return out


def _group(files: list[InputFile]) -> InputFile:
    """One unit of ``files`` (a single file stays itself)."""
    if len(files) == 1:
        return files[0]
    first = files[0]
    return InputFile(first.uri, sum(f.size for f in files), first.format, None,
                     version=group_version(files), members=tuple(files))


def resumable_units(state: OutputState, identity: dict[str, Any],
                    inputs: list[InputFile], output_uri: str,
                    unknown: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The committed units a run with ``identity`` over ``inputs`` may keep.

    ``unknown`` names identity fields not settled yet (checked in a later call).

    Raises :class:`OutputError` when the output holds anything the run cannot continue: files
    of a run without a manifest, a run with other settings, or units of input files no longer
    in the input. Units whose file changed since (its size, or the version the store reports)
    are left out: they are embedded again.
    """
    hint = "pass --overwrite to replace it, or choose another output"
    if state.empty:
        return {}
    if state.identity is None:
        names = sorted(state.name(f) for f in state.files)
        raise ResumeRefused(
            f"output {output_uri} holds {len(names)} file(s) named as this pipeline names "
            f"its own (part-*.parquet, _rejects/, _manifest/; e.g. {', '.join(names[:3])}) "
            f"but no run manifest ({MANIFEST_DIR}/{RUN_FILE}): another tool's files, or a run "
            "stopped before it began; --overwrite deletes these files (and no other), or "
            "choose another output")
    changed = [f"{k}: {state.identity.get(k)!r} there, {identity.get(k)!r} now"
               for k in IDENTITY_FIELDS
               if k not in unknown and state.identity.get(k) != identity.get(k)]
    if changed:
        raise ResumeRefused(f"output {output_uri} holds a run with other settings, which would "
                          f"mix results ({'; '.join(changed)}); {hint}")
    sizes = {unit_key(f.unit): f for f in inputs}
    gone = [m["uri"] for k, m in state.units.items() if k not in sizes]
    if gone:
        raise ResumeRefused(f"output {output_uri} holds the rows of {len(gone)} file(s) that are "
                          f"not in the input now (e.g. {gone[0]}); {hint}")
    changed = {k: (f"{m['uri']} ({m['size']} -> {sizes[k].size} bytes)"
                   if m["size"] != sizes[k].size else
                   f"{m['uri']} (store version {m.get('version')} -> {sizes[k].version})")
               for k, m in state.units.items() if m["size"] != sizes[k].size
               or (m.get("version") and sizes[k].version and m["version"] != sizes[k].version)}
    if changed:
        # Its rows are embedded again; its old files (no longer named by a kept manifest)
        # are deleted with the other strays before the run.
        log.warning("%d input file(s) changed since the earlier run at %s and are embedded "
                    "again, e.g. %s", len(changed), output_uri, next(iter(changed.values())))
    return {k: m for k, m in state.units.items() if k not in changed}


def stray_files(fs, state: OutputState, keep: dict[str, dict[str, Any]]) -> list[str]:
    """Output files that no kept manifest names: parts of uncommitted units, temporaries."""
    named = {f for m in keep.values() for f in m["files"]}
    stray = []
    for path in state.files:
        rel = state.name(path)
        if rel.startswith(MANIFEST_DIR + "/"):
            key = posixpath.basename(rel).removeprefix("unit-").removesuffix(".json")
            if rel == f"{MANIFEST_DIR}/{RUN_FILE}" or key in keep:
                continue
            stray.append(path)
        elif rel not in named and rel != SUMMARY_NAME:
            stray.append(path)
    return stray


def incomplete_units(state: OutputState, keep: dict[str, dict[str, Any]]) -> list[str]:
    """Kept units some of whose files are gone from the output (deleted by hand, or a copy
    that missed some): they must be redone, not trusted."""
    present = {state.name(p) for p in state.files}
    return [k for k, m in keep.items() if not set(m["files"]) <= present]


def encode_types(id_type, keep_types) -> str:
    """The run's settled id and kept-column types as text for ``_run.json`` (an Arrow schema)."""



    fields = [pa.field("id", id_type or pa.null())]
    for name, kind in keep_types:
        text = kind == JSON_TEXT
        fields.append(pa.field(name, pa.string() if text else kind,
                               metadata={"json_text": "1"} if text else None))
    return base64.b64encode(pa.schema(fields).serialize().to_pybytes()).decode()


def decode_types(text: str) -> tuple[Any, tuple[tuple[str, Any], ...]]:
    """``(id_type, keep_types)`` from :func:`encode_types`."""



    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    id_type = None if pa.types.is_null(schema.field(0).type) else schema.field(0).type
    keep = tuple((f.name, JSON_TEXT if (f.metadata or {}).get(b"json_text") else f.type)
                 for f in list(schema)[1:])
    return id_type, keep


def run_identity(config, dtype: str | None, model, inputs=None) -> dict[str, Any]:
    """The settings that decide what the output holds (see :data:`IDENTITY_FIELDS`), and the
    column types settled for it (adopted by a resume, not compared). ``config`` is the
    :class:`~pipeline.config.RunConfig`, ``dtype`` the encoder's resolved compute dtype (None:
    not known yet), ``model`` the driver's :class:`~pipeline.plan.ModelInfo`, ``inputs`` the
    pre-flight's :class:`~pipeline.preflight.Inputs`."""
    types = encode_types(inputs.id_type, inputs.keep_types) if inputs else None
    return {"types": types} | {
        "model_fingerprint": model.fingerprint,
        "tokenizer_sha256": hashlib.sha256(model.tokenizer_json.encode()).hexdigest(),
        "task": config.task, "dims": list(config.dims), "output_dtype": config.output_dtype,
        "dtype": dtype, "id_column": config.id_column, "text_column": config.text_column,
        "keep_columns": list(config.keep_columns), "on_duplicate": config.on_duplicate,
        "long_text": config.long_text_spec.identity(),
        "model_id": model.model_id, "revision": model.revision,
    }


def write_identity(fs, path: str, identity: dict[str, Any]) -> None:
    publish_json(fs, f"{path.rstrip('/')}/{MANIFEST_DIR}/{RUN_FILE}",
               {"identity": identity, "created": time.time()})


COUNTS = ("rows", "row_sum", "rows_embedded", "rows_rejected", "tokens", "texts_truncated",
          "grid_tokens", "batch_grid_tokens", "bytes",
          "rows_new", "rows_changed", "rows_unchanged", "rows_reused",  # nightly
          "chunks", "docs_chunked", "overlap_tokens")  # --long-text chunk
MAXIMA = ("chunks_max",)
TIMES = ("tokenize_s", "encode_s", "write_s")


@dataclasses.dataclass
class Totals:
    """Counts, stage times, reject reasons and files summed over write records or committed
    units: the one sum behind each unit's manifest, the run summary and the nightly counts."""

    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(COUNTS + MAXIMA, 0))
    times: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TIMES, 0.0))
    reject_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    encode_first_start: float = 0.0  # epoch seconds of the first encoder window (0: none)
    encode_last_end: float = 0.0

    @classmethod
    def of(cls, items: Iterable[Mapping[str, Any]]) -> "Totals":
        totals = cls()
        for item in items:
            totals.add(item)
        return totals

    def add(self, item: Mapping[str, Any]) -> "Totals":
        """Add a write record, or a unit's manifest (both carry the same fields)."""
        for k in COUNTS:
            self.counts[k] += item.get(k, 0)
        for k in MAXIMA:
            self.counts[k] = max(self.counts[k], item.get(k, 0))
        for k in TIMES:
            self.times[k] += item.get(k, 0)
        for reason, n in item.get("reject_reasons", {}).items():
            self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + n
        self.files += item.get("files", [])
        if item.get("encode_first_start"):
            first = self.encode_first_start
            self.encode_first_start = min(first, item["encode_first_start"]) if first \
                else item["encode_first_start"]
            self.encode_last_end = max(self.encode_last_end, item["encode_last_end"])
        return self

    def as_dict(self) -> dict[str, Any]:
        """The fields as a manifest holds them (flat)."""
        return self.counts | self.times | {
            "reject_reasons": self.reject_reasons, "files": self.files,
            "encode_first_start": self.encode_first_start,
            "encode_last_end": self.encode_last_end}


def merge(into: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
    """Add one write record of a unit to that unit's running totals (its manifest to be)."""
    if into is None:
        into = {"unit": record["unit"], "uri": record["source"], "file_rows": -1,
                "file_rowsum": -1, "first_reject": None} | Totals().as_dict()
    into |= Totals.of([into, record]).as_dict()
    into["file_rows"] = max(into["file_rows"], record["file_rows"])
    into["file_rowsum"] = max(into["file_rowsum"], record["file_rowsum"])
    into["first_reject"] = into["first_reject"] or record.get("first_reject")
    if "slices" in record:  # a unit of several files: each part file's slice of each file
        into.setdefault("slices", {}).update(record["slices"])
        counted = into.setdefault("member_rows", {})
        for uri, (rows, row_sum) in record["member_rows"].items():
            before = counted.get(uri, (0, 0))
            counted[uri] = [before[0] + rows, before[1] + row_sum]
    return into


def complete(unit: dict[str, Any]) -> bool:
    """All of the file's rows are out: their count and the sum of their numbers match (for
    a unit of several files: the checksum of their files and numbers, summed per write)."""
    return unit["file_rows"] >= 0 and unit["rows"] == unit["file_rows"] \
        and unit["row_sum"] % CHECKSUM_MOD == unit["file_rowsum"] % CHECKSUM_MOD


class Tracker:
    """Sums the write records of a run's units and commits each unit once it is complete."""

    def __init__(self, files: Iterable[InputFile], commit: Callable[[dict[str, Any]], None]):
        self.files = {unit_key(f.unit): f for f in files}
        self.open: dict[str, dict[str, Any]] = {}
        self.committed: dict[str, dict[str, Any]] = {}
        self._commit = commit

    def add(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Take one write record; returns the unit's manifest if this completed it."""
        key = record["unit"]
        if key in self.committed or key not in self.files:
            raise RowsDuplicated(f"rows of {record['source']} arrived after its unit was "
                                 "committed (or it is not an input of this run)")
        if "slices" in record:  # held as arrays of [file index, rows] (see packed_slices)
            record = record | {"slices": self._packed(key, record["slices"])}
        unit = merge(self.open.get(key), record)
        self.open[key] = unit
        if 0 <= unit["file_rows"] < unit["rows"]:
            raise RowsDuplicated(f"{unit['uri']}: {unit['rows']} rows written for a file of "
                                 f"{unit['file_rows']}; a row came out twice")
        if complete(unit):
            return self._finish(key)
        return None

    def _packed(self, key: str, slices: dict[str, list]) -> dict[str, np.ndarray]:
        """A write record's slices (``[file URI, rows]`` runs by part file) as arrays of
        ``[file index in the unit's members, rows]``."""
        index = {m.uri: i for i, m in enumerate(self.files[key].members)}
        try:
            return {name: np.array([[index[uri], n] for uri, n in runs],
                                   dtype=np.int64).reshape(-1, 2)
                    for name, runs in slices.items()}
        except KeyError as err:
            raise OutputError(f"a write of {self.files[key].unit} names rows of "
                              f"{err.args[0]}, not one of its files") from None

    def finish_empty(self, key: str, rows: int) -> dict[str, Any] | None:
        """Commit a unit that produced no row if its file is indeed empty (``rows`` == 0)."""
        if rows:
            return None
        f = self.files[key]
        self.open[key] = merge(None, {"unit": key, "source": f.unit, "file_rows": 0,
                                      "file_rowsum": 0})
        return self._finish(key)

    def _finish(self, key: str) -> dict[str, Any]:
        unit, f = self.open.pop(key), self.files[key]
        unit |= {"size": f.size, "version": f.version, "committed_at": time.time()}
        if f.members:  # what a resume needs to plan the same unit again
            unit["members"] = [m.uri for m in f.members]
            rows, slices = unit.pop("member_rows", None), unit.pop("slices", None)
            if rows is not None and slices is not None:
                # What a night needs to copy an unchanged file's rows out of this unit's part
                # files instead of reading it again (pipeline/stages/carry.py): each file's
                # size, version, rows and the sum of their numbers, and each part file's
                # slices, [file's index in ``members``, rows] in the part file's order.
                unit["member_files"] = [[m.size, m.version, *rows.get(m.uri, (0, 0))]
                                        for m in f.members]
                unit["slices"] = {name: runs.tolist() for name, runs in slices.items()}
        self._commit(unit)
        # Kept without the slices, which a night's shuffle multiplies by the writes a unit's
        # rows were dealt to (the driver's memory would grow with rows, not files); the
        # published manifest has them.
        self.committed[key] = {k: v for k, v in unit.items() if k != "slices"}
        return unit

    def unseen(self) -> list[str]:
        """Units that produced no row at all."""
        return [k for k in self.files if k not in self.open and k not in self.committed]


def manifest_path(output_path: str, key: str) -> str:
    return f"{output_path.rstrip('/')}/{unit_manifest_name(key)}"
