"""Where the data lives: fsspec filesystems, input listing and format detection, output checks.

Everything here runs in the pre-flight on the driver, so that a wrong path, an unreachable
endpoint, an unknown format, a missing column or an unwritable output fails in seconds with a
message naming the URI, before Ray starts any work.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, OutputError, StorageError

FORMAT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet",
                   ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
OUTPUT_PART_GLOB = "part-*.parquet"
OWN_PART = re.compile(r"part-[0-9a-f]{16}-[0-9a-f]{12}\.parquet")  # writers.part_name's names
SUMMARY_NAME = "_summary.json"
LATEST_NAME = "_LATEST"  # a nightly job's root: the name of its newest snapshot folder
REJECTS_DIR = "_rejects"
DOCUMENTS_DIR = "_documents"  # --long-text chunk --doc-vectors: one vector per document
SIDE_DIRS = (REJECTS_DIR, DOCUMENTS_DIR)  # part files beside the output's own rows
MANIFEST_DIR = "_manifest"
# S3 data access: botocore's standard retry mode backs off on throttling, 5xx and resets;
# the connect timeout bounds how long an unreachable endpoint takes to report.
# One client serves every thread of a process (open_filesystem), and the driver's pools run 16
# requests at once: more connections than botocore's 10.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 120, "max_pool_connections": 32,
             "retries": {"max_attempts": 5, "mode": "standard"}}
# The pre-flight (listing, sampling, the output probe) must report a dead endpoint in seconds.
S3_PREFLIGHT_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "max_pool_connections": 32,
                       "retries": {"max_attempts": 2, "mode": "standard"}}


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input shard: its URI, size in bytes, format and compression."""

    uri: str
    size: int  # bytes of the file, or of the slice's row groups
    format: str  # parquet | jsonl
    compression: str | None  # gzip | zstd | None
    row_groups: tuple[int, int] | None = None  # a slice of a large Parquet file: [start, stop)
    # What the store says identifies this content (S3 ETag, GCS generation, local mtime):
    # a resume embeds again a unit whose file changed, even if its size did not.
    version: str | None = None
    # A unit of several small files (``pipeline/units.group_units``): they, in order; then
    # ``uri`` is the first one's, ``size`` their sum and ``version`` a digest of theirs.
    members: tuple["InputFile", ...] = ()

    @property
    def unit(self) -> str:
        """The unit of work this is: the file's URI, with the row-group slice if it is one,
        or the first file's URI and the count for a unit of several files."""
        if self.members:
            return f"{self.uri}{GROUP_MARK}{len(self.members)}]"
        if self.row_groups is None:
            return self.uri
        start, stop = self.row_groups
        return f"{self.uri}#row-groups[{start}:{stop}]"

    @property
    def files(self) -> tuple["InputFile", ...]:
        """The input files this unit reads: its members, or itself."""
        return self.members or (self,)


GROUP_MARK = "#files["  # in the name of a unit of several files


def is_group(unit: str) -> bool:
    """Whether a unit's name (:attr:`InputFile.unit`) is that of a unit of several files."""
    return GROUP_MARK in unit


# The row check of a unit of several files: row numbers restart in each file, so their plain
# sum cannot tell a row of one file written twice from the same row of another lost. Each
# file's rows count with a weight of its own (from its URI), modulo a Mersenne prime.
CHECKSUM_MOD = (1 << 61) - 1


def file_rows_checksum(uri: str, rows: int, row_sum: int) -> int:
    """The checksum of ``rows`` rows of ``uri`` whose row numbers add up to ``row_sum``."""
    weight = int(hashlib.sha256(uri.encode("utf-8")).hexdigest()[:8], 16) | 1
    return weight * (row_sum + rows) % CHECKSUM_MOD


def group_version(members: Iterable[InputFile]) -> str:
    """A unit of several files' version: a digest of its files' URIs, sizes and versions."""
    text = "\n".join(f"{m.uri}\t{m.size}\t{m.version}" for m in members)
    return "files:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def unit_key(uri: str) -> str:
    """The key of a unit (an input file's URI, or a row-group slice's): a stable name
    for its output files (``part-<key>-...``) and its manifest (``unit-<key>.json``)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


ICEBERG_SCHEME = "iceberg:"


def is_iceberg(uri: str) -> bool:
    """Whether ``uri`` names an Iceberg table (``iceberg:ns.table`` or ``iceberg://ns.table``);
    here so that telling one apart needs no pyiceberg (``pipeline/io/iceberg.py`` reads them)."""
    return uri.startswith(ICEBERG_SCHEME)


def open_filesystem(uri: str, storage_options: dict[str, Any] | None = None,
                    preflight: bool = False):
    """``(fsspec filesystem, path within it)`` for ``uri``; S3 gets bounded retries.

    ``preflight`` trades retries for a quick failure (listing and probes before a run).
    An S3 filesystem is made once per process for each set of options (:func:`_s3_filesystem`).
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    with storage_errors(uri, "open"):
        if protocol not in ("s3", "s3a"):
            return fsspec.core.url_to_fs(uri)
        # Deep copies: botocore rewrites a config's ``retries`` in place when it makes a
        # client, which would change these constants (and the cache key) under us.
        options = copy.deepcopy(dict(storage_options or {}))
        config = copy.deepcopy(S3_PREFLIGHT_CONFIG if preflight else S3_CONFIG)
        options["config_kwargs"] = config | dict(options.get("config_kwargs") or {})
        cls = fsspec.get_filesystem_class(protocol)
        options |= cls._get_kwargs_from_urls(uri)  # e.g. ?versionId=: a version-aware client
        fs = _s3_filesystem(protocol, options)
        return fs, fs._strip_protocol(uri)


# S3 filesystems of this process, by protocol and options. A new S3FileSystem is a new
# botocore session, which parses the S3 service model again: ~0.1-0.25 CPU-s on the 2-core
# dev machine, paid by every read task, write task, commit and probe when each made its own
# (36 of them in one two-run enrichment test); a cached one costs ~5 ms. fsspec's own cache
# keys by thread as well, and the driver's thread pools come and go, so the cache is ours:
# one instance serves every thread (its calls run on fsspec's one event-loop thread).
# The AWS_* environment is part of the key, as the options are.
# Listings are never cached (``use_listings_cache`` False unless the options say otherwise):
# a shared instance must not answer a listing from before this process's own last write.
_FILESYSTEMS: dict[str, fsspec.AbstractFileSystem] = {}
_FILESYSTEMS_PID = [os.getpid()]
_FILESYSTEMS_LOCK = threading.Lock()
MAX_CACHED_FILESYSTEMS = 16  # distinct option sets per process (a job uses two or three)


def _mtime(path: str) -> int | None:
    try:
        return os.stat(os.path.expanduser(path)).st_mtime_ns
    except OSError:
        return None


def _s3_filesystem(protocol: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    options = {"use_listings_cache": False, **options, "skip_instance_cache": True}
    # botocore also reads AWS_* variables (endpoint, profile, region, keys) and the shared
    # credentials and config files when it makes a client: a change of any of them in this
    # process (a rotated key written to the file, say) gets a new one.
    aws_env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    key = hashlib.sha256(json.dumps([protocol, options, aws_env, [_mtime(f) for f in files]],
                                    sort_keys=True, default=repr).encode()).hexdigest()
    with _FILESYSTEMS_LOCK:
        if _FILESYSTEMS_PID[0] != os.getpid():  # a forked child: its parent's clients are not its own
            _FILESYSTEMS.clear()
            _FILESYSTEMS_PID[0] = os.getpid()
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = fsspec.filesystem(protocol, **options)
            if len(_FILESYSTEMS) >= MAX_CACHED_FILESYSTEMS:
                _FILESYSTEMS.pop(next(iter(_FILESYSTEMS)))  # the oldest
            _FILESYSTEMS[key] = fs
        return fs


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for ``path`` on ``fs`` (``s3://bucket/key``; local paths stay plain)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Turn a backend error into a :class:`StorageError` that names ``uri`` and the cause."""
    try:
        yield
    except (InputError, OutputError, StorageError):
        raise
    except FileNotFoundError:
        raise
    except pa.ArrowInvalid as err:  # the bytes arrived: the file itself is not what it claims
        raise InputError(f"cannot {action} {uri}: not a readable file of its format ({err})") \
            from err
    except PermissionError as err:
        raise StorageError(f"cannot {action} {uri}: permission denied ({err}); check the "
                           "credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID, ...)") from err
    except Exception as err:  # noqa: BLE001 - any backend failure, reported with its type
        raise StorageError(f"cannot {action} {uri}: {type(err).__name__}: {err} (is the "
                           "endpoint reachable? for S3-compatible stores set --s3-endpoint or "
                           "AWS_ENDPOINT_URL)") from err


def detect_format(path: str, forced: str = "auto") -> tuple[str | None, str | None]:
    """``(format, compression)`` of a file name; format is None when the suffix is unknown."""
    name = posixpath.basename(path).lower()
    stem, ext = posixpath.splitext(name)
    compression = COMPRESSION_SUFFIXES.get(ext)
    if compression:
        stem, ext = posixpath.splitext(stem)
    fmt = FORMAT_SUFFIXES.get(ext)
    if forced != "auto":
        fmt = forced
    if fmt == "parquet" and compression:
        fmt = None  # Parquet compresses inside the file; a .parquet.gz is not readable as such
    return fmt, compression


def list_inputs(uri: str, storage_options: dict[str, Any] | None = None,
                forced_format: str = "auto") -> list[InputFile]:
    """The input shards under ``uri`` (a file, a prefix, or a glob), sorted by URI.

    Names starting with ``_`` or ``.`` below the prefix are skipped (metadata and hidden files,
    as Ray Data and Spark skip them). Raises :class:`InputError` for a missing input, an empty
    prefix, unknown or mixed formats; :class:`StorageError` when the store cannot be reached.
    """
    fs, path = open_filesystem(uri, storage_options, preflight=True)
    entries = _list(fs, uri, path)
    files, unknown = [], []
    for entry_path, size, version in entries:
        fmt, compression = detect_format(entry_path, forced_format)
        target = files if fmt else unknown
        target.append(InputFile(to_uri(fs, entry_path), int(size or 0), fmt or "", compression,
                                version=version))
    if unknown:
        shown = ", ".join(f.uri for f in unknown[:5])
        raise InputError(
            f"{len(unknown)} input file(s) under {uri} have no known format ({shown}); known "
            f"suffixes: {sorted(FORMAT_SUFFIXES)} with optional {sorted(COMPRESSION_SUFFIXES)} "
            "for JSONL; pass --format parquet|jsonl or a narrower glob"
        )
    formats = sorted({f.format for f in files})
    if len(formats) > 1:
        raise InputError(f"input {uri} mixes formats {formats}; give one format per run "
                         "(a narrower prefix or glob)")
    return sorted(files, key=lambda f: f.uri)


def split_large_parquet(files: list[InputFile], storage_options: dict[str, Any] | None,
                        unit_bytes: int) -> list[InputFile]:
    """Parquet files over ``unit_bytes`` as slices of whole row groups of about that size.

    A slice is a unit of its own (committed and resumed alone) and a read task of its own,
    so one large file is read in parallel. Only the footers of the large files are read.
    """
    large = [f for f in files if f.format == "parquet" and f.size > unit_bytes]
    if not large:
        return files

    def slices(file: InputFile) -> list[InputFile]:
        fs, path = open_filesystem(file.uri, storage_options, preflight=True)
        with storage_errors(file.uri, "read the footer of"), fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        sizes = [sum(meta.row_group(g).column(c).total_compressed_size
                     for c in range(meta.num_columns)) for g in range(meta.num_row_groups)]
        out, start, acc = [], 0, 0
        for g, size in enumerate(sizes):
            if acc and acc + size > unit_bytes:
                out.append(dataclasses.replace(file, size=acc, row_groups=(start, g)))
                start, acc = g, 0
            acc += size
        if len(sizes) and not out:
            return [file]  # one slice: the file itself
        out.append(dataclasses.replace(file, size=acc, row_groups=(start, len(sizes))))
        return out

    with ThreadPoolExecutor(max_workers=16) as pool:
        split = dict(zip((f.uri for f in large), pool.map(slices, large)))
    return [piece for f in files for piece in split.get(f.uri, [f])]


def _version(info: dict) -> str | None:
    """The store's content version of a listed file (see :attr:`InputFile.version`)."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified"):
        if info.get(key):
            return f"{key}:{info[key]}"
    return None


def _list(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> list[tuple[str, int, str | None]]:
    with storage_errors(uri, "list"):
        if any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
            base = glob_base(path)
            entries = [(p, i.get("size", 0), _version(i)) for p, i in sorted(found.items())
                       if _is_file(p, i) and not _hidden(p[len(base):])]
            if not entries:
                raise InputError(f"input glob {uri} matches no data files (names starting "
                                 "with '_' or '.' are skipped)")
            return entries
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise InputError(f"input {uri} does not exist") from None
        if info.get("type") != "directory":
            return [(info["name"], info.get("size", 0), _version(info))]
        if is_local(fs):
            entries = _find_local(info["name"])
        else:
            base = path.rstrip("/")
            entries = [(p, i.get("size", 0), _version(i))
                       for p, i in sorted(fs.find(path, detail=True).items())
                       if not _hidden(p[len(base):]) and _is_file(p, i)]
    if not entries:
        raise InputError(f"input prefix {uri} holds no data files (names starting with '_' or "
                         "'.' are skipped)")
    return entries


def _find_local(root: str) -> list[tuple[str, int, str | None]]:
    """The files under the local folder ``root`` as ``_list`` gives them, sorted by path:
    what ``fs.find`` and fsspec's local ``info`` would give (a symbolic link's size is its
    target's, its version its own mtime; a link is not followed into a folder), ~2x faster
    (one ``scandir`` per folder, no info dict per file: 100,000 files in ~0.6 s). Hidden folders are not entered, so their files are never listed. A folder that
    cannot be read fails the listing (fsspec's walk would leave it out, and its rows with
    it)."""
    out: list[tuple[str, int, str | None]] = []
    pending = [root.rstrip("/") or "/"]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:  # removed while listed, as fsspec's walk leaves it
            continue
        except PermissionError as err:
            raise InputError(
                f"cannot list {folder}: permission denied ({err.strerror}); every folder under "
                "a local input prefix must be readable: make it readable, or give a narrower "
                "prefix or a glob that leaves it out (e.g. a mount's lost+found)") from err
        for entry in entries:
            if entry.name.startswith(("_", ".")):
                continue
            try:
                own = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                size = own.st_size
                if entry.is_symlink():
                    try:
                        size = entry.stat(follow_symlinks=True).st_size
                    except OSError:
                        size = 0
            except FileNotFoundError:
                continue
            out.append((entry.path, size, f"mtime:{own.st_mtime}" if own.st_mtime else None))
    out.sort()
    return out


def glob_base(path: str) -> str:
    """The directory part of a glob before its first wildcard (``a/b/*/c*`` -> ``a/b/``)."""
    cut = min((i for i in (path.find(ch) for ch in "*?[") if i >= 0), default=len(path))
    return path[: path.rfind("/", 0, cut) + 1]


def _is_file(path: str, info: dict) -> bool:
    # Zero-byte keys ending in "/" are the folder markers of S3 consoles and sync tools.
    return info.get("type") != "directory" and not path.endswith("/")


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def prepare_output(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check that ``uri`` is writable; returns the pipeline's files already there (an earlier
    run to resume, or to replace with ``--overwrite``)."""
    fs, path = open_filesystem(uri, storage_options, preflight=True)
    with storage_errors(uri, "prepare output"):
        previous, foreign = output_files(fs, path)
    if foreign:
        names = [relative(f, path, is_local(fs)) for f in foreign]
        raise OutputError(
            f"output {uri} holds {len(names)} part file(s) this pipeline did not write (e.g. "
            f"{', '.join(names[:3])}): readers of the output would take them for its files, "
            "and it never deletes them (--overwrite neither); move them, or choose another "
            "output")
    probe = f"{path.rstrip('/')}/_write_probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):
            # Not on object stores: s3fs's makedirs would create a missing bucket.
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any backend failure, reported with its type
        raise OutputError(f"cannot write to output {uri}: {type(err).__name__}: {err}") from err
    return previous


def remove_files(uri: str, files: list[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete files of the output ``uri`` found by :func:`own_files` (only those)."""
    if not files:
        return
    fs, _ = open_filesystem(uri, storage_options)
    with storage_errors(uri, "delete files at"):
        fs.rm(files)


def relative(path: str, base: str, local: bool = False) -> str:
    """``path`` relative to the folder ``base``, both normalised (``./`` and ``//`` folded; on
    local disks, symbolic links in the folders resolved, never the file's own name), so that
    any spelling of an output names the same files."""
    p = posixpath.normpath(path)
    plain = posixpath.normpath(base.rstrip("/") or "/").rstrip("/") + "/"
    if p.startswith(plain):  # the common case: no link to resolve (realpath stats each part)
        return p[len(plain):]
    bases = [plain]
    candidates = [p]
    if local:
        bases.append(os.path.realpath(base))
        candidates.append(posixpath.join(os.path.realpath(posixpath.dirname(p)),
                                         posixpath.basename(p)))
    for candidate in candidates:
        for b in bases:
            prefix = b.rstrip("/") + "/"
            if candidate.startswith(prefix):
                return candidate[len(prefix):]
    return posixpath.basename(p)


def is_side_file(name: str) -> bool:
    """Whether an output file name (relative to the output) is a reject or document file, not
    one of the output's own rows."""
    return name.partition("/")[0] in SIDE_DIRS


def own_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The files the pipeline writes under an output ``path``: parts, rejects, manifests,
    the summary, and on local disks the temporaries of interrupted writes."""
    return output_files(fs, path)[0]


def output_files(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str], list[str]]:
    """``(own, foreign)`` under an output ``path``: the pipeline's files (:func:`own_files`),
    and the ``part-*.parquet`` files where it writes its own that it did not write (another
    tool's: named otherwise than :func:`~pipeline.io.writers.part_name` names them)."""
    try:
        if not fs.isdir(path):
            return [], []
        found = fs.find(path)
    except FileNotFoundError:
        return [], []
    ours, foreign = [], []
    for p in found:
        rel = relative(p, path, is_local(fs))
        top, _, rest = rel.partition("/")
        if not rest:
            name = top  # a file at the top
        elif top in SIDE_DIRS and "/" not in rest:
            name = rest  # a file of _rejects/ or _documents/
        else:
            name = None
        if rel == SUMMARY_NAME or top == MANIFEST_DIR or (name and _is_own(name)):
            ours.append(p)
        elif name and fnmatch.fnmatch(name, OUTPUT_PART_GLOB):
            foreign.append(p)
    return sorted(ours), sorted(foreign)


def _is_own(name: str) -> bool:
    return bool(OWN_PART.fullmatch(name)) or (name.startswith(".") and ".tmp-" in name)


def refuse_nightly_root(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse ``uri`` as the output of ``run`` or ``enrich`` when it holds ``_LATEST``: it is
    a nightly job's root, and their files beside its snapshots would stop its next night."""
    fs, path = open_filesystem(uri, storage_options, preflight=True)
    with storage_errors(uri, "prepare output"):
        nightly = fs.exists(f"{path.rstrip('/')}/{LATEST_NAME}")
    if nightly:
        raise OutputError(f"output {uri} holds {LATEST_NAME}: it is the root of a nightly job's "
                          "snapshots, and this job's files there would stop its next night; "
                          "choose another output")


def is_latest_temporary(path: str) -> bool:
    """A temporary of ``_LATEST`` (a write of it cut short: :func:`open_for_publish`)."""
    return posixpath.basename(path).startswith(f".{LATEST_NAME}.tmp-")


def check_disjoint(input_uri: str, output_uri: str) -> None:
    """Refuse an output inside the input prefix: the next run would read its own output."""
    if any(ch in input_uri for ch in "*?["):
        input_uri = glob_base(input_uri)
    a, b = _normalise(input_uri), _normalise(output_uri)
    if b == a or b.startswith(a.rstrip("/") + "/"):
        raise OutputError(f"output {output_uri} lies inside the input {input_uri}; choose an "
                          "output outside the input prefix")


def _normalise(uri: str) -> str:
    if "://" not in uri or uri.startswith("file://"):
        return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return uri.rstrip("/")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


@contextlib.contextmanager
def open_for_publish(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A writable file that appears at ``path`` whole or not at all.

    Object stores publish an upload only when it completes; on local disks the file is
    written under a hidden temporary name and renamed into place.
    """
    target = path
    if is_local(fs):
        parent, _, name = path.rpartition("/")
        fs.makedirs(parent, exist_ok=True)
        target = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(target, "wb") as f:
        yield f
    if target != path:
        fs.mv(target, path)


def publish_json(fs: fsspec.AbstractFileSystem, path: str, document: dict[str, Any]) -> str:
    """Publish a JSON document (a manifest, a summary) whole or not at all; returns ``path``.
    The one JSON writer of the pipeline's own files."""
    with storage_errors(to_uri(fs, path), "write"), open_for_publish(fs, path) as f:
        f.write(json.dumps(document, indent=1, sort_keys=True, default=_jsonable).encode())
    return path


def _jsonable(value: Any) -> Any:
    """What :func:`publish_json` writes for a value JSON has no type for: an array (a
    manifest's slices as the driver holds them, ``units.packed_slices``) as lists, anything
    else as its text."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)
