"""The nightly job's snapshot folders under its output: ``_LATEST``, listing, the previous
snapshot's identity, part and document files, naming, resuming an unfinished one, pruning.
Driver side, no Ray (the job is ``pipeline/jobs/nightly.py``)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from . import units
from .io.errors import OutputError
from .io.storage import (DOCUMENTS_DIR, LATEST_NAME, MANIFEST_DIR, SUMMARY_NAME, InputFile,
                         is_local, is_side_file, open_for_publish, publish_json, relative,
                         storage_errors, to_uri, unit_key)

LATEST = LATEST_NAME
COPY_THREADS = 16  # carried files copied at once (a server-side copy each on object stores)
# Counts of the work a unit cost when it ran; a carried unit cost none of it tonight. (Its
# ``bytes``, those of its files, stay: the files are in the snapshot, ``output_bytes``.)
WORK_COUNTS = ("tokens", "texts_truncated", "grid_tokens", "batch_grid_tokens", *units.TIMES,
               "encode_first_start", "encode_last_end")
SNAPSHOT_RE = re.compile(r"^snapshot-\d{8}T\d{6}Z(-\d+)?$")


@dataclasses.dataclass
class Previous:
    """The snapshot ``_LATEST`` names: its identity, row count, part files and document files
    (``_documents/``, made with ``--doc-vectors``), each file as (URI, bytes)."""

    name: str
    identity: dict[str, Any]
    rows: int
    files: list[tuple[str, int]]
    documents: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    uri: str = ""  # the snapshot folder's URI (files are named under it)
    units: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # its manifests

    def name_of(self, uri: str) -> str:
        """A file's name within the snapshot (as manifests name files)."""
        return uri.removeprefix(self.uri.rstrip("/") + "/")


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
    part and document files from its unit manifests (with their sizes)."""
    base = f"{root}/{name}"
    uri = f"{root_uri}/{name}"
    with storage_errors(uri, "read the previous snapshot"):
        if not fs.exists(f"{base}/{SUMMARY_NAME}"):
            raise OutputError(f"{root_uri}/{LATEST} names {name}, which has no {SUMMARY_NAME}; "
                              f"restore {uri} or delete {LATEST} to start afresh")
        summary = json.loads(fs.cat_file(f"{base}/{SUMMARY_NAME}"))
        # The sizes from one listing (pages of 1,000 on object stores), not a HEAD per file:
        # a snapshot of 100,000 units would cost that many requests one after another.
        listed = fs.find(base, detail=True)
        local = is_local(fs)
        sizes = {relative(p, base, local): int(i.get("size") or 0) for p, i in listed.items()}
        state = units.load_state(fs, base, sorted(
            p for p in listed if relative(p, base, local).startswith(MANIFEST_DIR + "/")))
    names = sorted(f for u in state.units.values() for f in u["files"])
    missing = [n for n in names if n not in sizes]
    if missing:
        raise OutputError(f"{uri} lacks {len(missing)} file(s) its manifests name (e.g. "
                          f"{missing[0]}); restore them or delete {root_uri}/{LATEST} to start "
                          "afresh")
    files = [(f"{uri}/{n}", sizes[n]) for n in names if not is_side_file(n)]
    documents = [(f"{uri}/{n}", sizes[n]) for n in names if n.startswith(DOCUMENTS_DIR + "/")]
    if state.identity is None:
        raise OutputError(f"{uri} has no {MANIFEST_DIR}/{units.RUN_FILE}: not a snapshot of "
                          "this job")
    return Previous(name, state.identity, int(summary.get("rows_out", 0)), files, documents,
                    uri=uri, units=state.units)


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


def carry_refusal(previous: Previous, identity: dict[str, Any]) -> str | None:
    """Why no unit can be carried from ``previous`` into a snapshot of ``identity`` (None:
    units can be): its files must be what today's run would write, so every setting and
    settled column type must be today's (``--keep-chunk-text`` and ``--doc-vectors`` too)."""
    differs = [f for f in (*units.IDENTITY_FIELDS, "types")
               if previous.identity.get(f) != identity.get(f)]
    return f"settings changed: {', '.join(differs)}" if differs else None


def carried_manifest(previous: Previous, manifest: dict[str, Any]) -> dict[str, Any]:
    """A unit's manifest in today's snapshot when it is carried from ``previous``: the same
    files and rows, every good row unchanged and reused, none of the work counted."""
    good = manifest["rows_embedded"]
    return manifest | dict.fromkeys(WORK_COUNTS, 0) | {
        "rows_new": 0, "rows_changed": 0, "rows_unchanged": good, "rows_reused": good,
        "carried_from": previous.name, "committed_at": time.time()}


def carriable(previous: Previous, todo: Iterable[InputFile]) -> dict[str, dict[str, Any]]:
    """The units of ``todo`` the previous snapshot holds as they are today: the same files
    (its manifest's members), size and store version (a unit with a file without a version
    is not trusted: a group's version is a digest of its files' and would still match), and
    no row rejected there as a duplicate id (with the other file changed since, that row may
    be the one to keep tonight). Keyed by unit, their previous manifests."""
    out = {}
    for f in todo:
        key = unit_key(f.unit)
        m = previous.units.get(key)
        if m is None or m["size"] != f.size or m.get("version") != f.version \
                or not all(x.version for x in (f, *f.members)):
            continue
        if (m.get("members") or []) != [x.uri for x in f.members]:
            continue
        if any(reason == "duplicate id" for reason in m.get("reject_reasons", {})):
            continue
        out[key] = m
    return out


def carry_units(previous: Previous, manifests: dict[str, dict[str, Any]], fs,
                out_path: str) -> dict[str, dict[str, Any]]:
    """Copy each unit's files from ``previous`` into the snapshot at ``out_path`` (same
    names), then commit it there with its :func:`carried_manifest`; returns those."""
    source = f"{out_path.rstrip('/').rsplit('/', 1)[0]}/{previous.name}"
    target = out_path.rstrip("/")
    local = is_local(fs)

    def carry(key: str) -> tuple[str, dict[str, Any]]:
        manifest = manifests[key]
        for name in manifest["files"]:
            with storage_errors(to_uri(fs, f"{source}/{name}"), "copy"):
                if local:
                    fs.makedirs(posixpath.dirname(f"{target}/{name}"), exist_ok=True)
                fs.copy(f"{source}/{name}", f"{target}/{name}")
        done = carried_manifest(previous, manifest)
        publish_json(fs, units.manifest_path(target, key), done)
        return key, done

    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        return dict(pool.map(carry, sorted(manifests)))
