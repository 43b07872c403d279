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
otherwise every row is encoded again (the counts still compare the two snapshots). With
``--long-text chunk`` a row is a document: an unchanged one keeps all its chunk vectors, and
with ``--doc-vectors`` its document vector too (from the previous snapshot's ``_documents/``;
a previous snapshot made without them is embedded again).

Units unchanged since the previous snapshot are carried, not read: a unit (a file, a row-group
slice, or a group of small files: the previous snapshot's grouping is planned again when all
of its files are listed) whose files have the size and store version (ETag, generation,
mtime) the previous snapshot's manifest recorded, made with every setting equal, has its
files copied into the new snapshot as they are (a server-side copy on object stores) and is
committed with every good row counted unchanged and reused. Its text is never read and its
vectors never travel; only its ids take part in the diff, as those of units committed
earlier do on a resume, so an id that a changed file repeats is rejected there (the row in
the unchanged file is kept, whatever the files' order). A unit whose previous manifest
counts a duplicate-id reject is not carried (the other file may have changed since).

The job is the ``run`` job (``pipeline/jobs/run.py``) with a spec: the diff of
``pipeline/stages/diff.py`` before the tokenizers, a ``content_hash`` column, the change
counts in the summary. The snapshot folders are ``pipeline/snapshots.py``.

How rows meet their previous version: today's rows and the previous snapshot's (id, hash,
vectors) are hashed by id into buckets and grouped by a Ray Data shuffle
(``groupby().map_groups``; ``pipeline/cluster/graph.py`` says which), so each id's rows meet in
one call of ``diff_bucket``, which classifies them in Arrow. The same call rejects an id that
occurs in more than one of today's files (a snapshot keys rows by id; the first by file and row
is kept), which a plain run does not check. A killed run is resumed by the next one: an
unfinished snapshot built on the same previous snapshot is picked up with its committed units
(``pipeline/units.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

from .. import units
from ..cluster.graph import Dataset, build_nightly_dataset
from ..config import RunConfig
from ..errors import RunFailed
from ..io import schema as S
from ..io.errors import OutputError
from ..io.storage import (SUMMARY_NAME, is_latest_temporary, is_side_file, open_filesystem,
                          prepare_output, remove_files)
from ..snapshots import (LATEST, Previous, carriable, carry_refusal, carry_units,
                         list_snapshots, load_previous, new_snapshot_name, prune, publish,
                         read_latest, unfinished_snapshot)
from ..stages.carry import MemberCopy, member_copy
from ..stages.diff import HASH_COLUMN, plan_diff, worth_gathering
from .run import Carry, JobSpec, Work, run

log = logging.getLogger("pipeline.nightly")


def nightly_spec(previous: Previous | None, snapshot: str) -> JobSpec:
    """The run of one snapshot: its identity records the base snapshot, the graph diffs
    against it, the output has a ``content_hash`` column, the summary counts the changes."""
    return JobSpec(
        identity={"nightly": {"base": previous.name if previous else None}},
        output=lambda spec: dataclasses.replace(spec, extra_columns=((HASH_COLUMN, S.HASH),)),
        graph=functools.partial(diff_graph, previous),
        summarize=functools.partial(summarize, previous, snapshot),
        group_hints=previous.units if previous else {},
        carry=functools.partial(carry, previous),
        gather=True,
    )


def carry(previous: Previous | None,
          job: Carry) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The units unchanged since the previous snapshot, copied into this one as they are
    (their files are what this run would write: same input, same settings), and the facts
    the summary reports when nothing else runs (``carried_now``: how many were copied now;
    the run counts them among the units kept)."""
    if previous is None:
        return {}, {}
    refusal = carry_refusal(previous, job.identity)
    if refusal:  # e.g. types: a new first file whose columns settle to other types
        log.info("no unit is carried from %s: %s", previous.name, refusal)
        return {}, {}
    # On a resume, units the diff committed before the interruption hold ids that a unit
    # carried now is never checked against (an input file restored since to its previous
    # version would put an id in the snapshot twice): the rest goes through the diff. The
    # first attempt carried before its diff started, so little is left to carry then.
    embedded = sorted(u["uri"] for u in job.kept.values() if not u.get("carried_from"))
    if embedded:
        log.info("resuming a snapshot with %d unit(s) embedded before the interruption (e.g. "
                 "%s): the units left are compared, not carried", len(embedded), embedded[0])
        return {}, {}
    found = carriable(previous, job.todo)
    if not found:
        return {}, {}
    return carry_units(previous, found, job.fs, job.out_path), {
        "reused_previous": True, "reembed_reason": None,
        "tokenizer_sha256": job.identity.get("tokenizer_sha256"), "carried_now": len(found)}


def touched_units(previous: Previous | None, work: Work,
                  sizes: dict[str, int]) -> tuple[MemberCopy, ...]:
    """The units to do of several files only some of which changed since the previous
    snapshot: their unchanged files' rows are copied from it (``pipeline/stages/carry.py``),
    the others read. Under the rules :func:`carry` follows: every setting today's, and not on
    a resume of a snapshot whose diff committed units already. ``sizes``: the previous
    snapshot's part files' bytes, by URI."""
    if previous is None or carry_refusal(previous, work.identity) \
            or any(not u.get("carried_from") for u in work.kept.values()):
        return ()
    copies = []
    for unit in work.plan.files:
        manifest = previous.units.get(units.unit_key(unit.unit))
        copy = member_copy(unit, manifest, previous.uri) if manifest else None
        if copy is not None:
            copies.append(dataclasses.replace(
                copy, output_uri=work.plan.output_uri,
                rows_per_file=work.plan.output.rows_per_file(),
                bytes=sum(sizes.get(copy.uri(name), 0) for name, _ in copy.parts)))
    if copies:
        log.info("%d unit(s) of several files partly changed: %d unchanged file(s) of theirs "
                 "are copied from %s, not read", len(copies),
                 sum(len(c.kept) for c in copies), previous.name)
    return tuple(copies)


def diff_graph(previous: Previous | None, work: Work) -> tuple[Dataset, dict[str, Any]]:
    """The nightly graph for ``work``, and whether the previous vectors are reused (and why
    not) for the summary."""
    plan, identity = work.plan, work.identity
    # The units this snapshot committed before a resume: their ids take part in the
    # duplicate check (a resumed run must not write an id twice).
    seen = tuple(sorted((f"{plan.output_uri.rstrip('/')}/{name}", unit["uri"])
                        for unit in work.kept.values() for name in unit["files"]
                        if not is_side_file(name)))
    # Units carried from the previous snapshot (their ids are among the seen ones above):
    # their rows are not compared again, so their previous files are not read.
    carried = {name for unit in work.kept.values()
               if previous and unit.get("carried_from") == previous.name
               for name in unit["files"]}
    sizes = dict(previous.files) if previous else {}
    copies = touched_units(previous, work, sizes)
    # A touched unit's previous part files, each read once: its changed files' rows are
    # compared, its copied files' ids are seen (as a carried unit's are).
    touched = {c.uri(name): (c.unit, c.ranges(name, copied=False), c.ranges(name, copied=True))
               for c in copies for name, _ in c.parts}
    # What the night compares (it sizes the buckets and picks the shuffle): the files read,
    # and of a touched unit's previous part files the share of its changed files' rows.
    units_by_name = {f.unit: f for f in plan.files}
    copied_bytes = sum(m.size for c in copies
                       for i, m in enumerate(units_by_name[c.unit].members) if i in c.kept)
    read_bytes = sum(f.size for f in plan.files) - copied_bytes  # of today's input
    compared_bytes = sum(
        sizes.get(uri, 0) * sum(n for _, n in changed)
        // max(1, sum(n for _, n in changed) + sum(n for _, n in kept))
        for uri, (_, changed, kept) in touched.items())
    diff = plan_diff(
        identity=identity, read=plan.read,
        previous_identity=previous.identity if previous else None,
        previous_files=tuple(f for f in previous.files if previous.name_of(f[0]) not in carried
                             and f[0] not in touched)
        if previous else (),
        previous_documents=tuple(f for f in previous.documents
                                 if previous.name_of(f[0]) not in carried) if previous else (),
        todo_bytes=read_bytes + compared_bytes,
        seen_files=seen, cpus=work.cpus)
    if previous is not None and not diff.reuse:
        log.warning("the previous snapshot %s: %s; every row is embedded again",
                    previous.name, diff.reembed_reason)
    if copies and not diff.reuse:  # a unit is touched only when every setting is today's
        raise RuntimeError(f"internal error: units touched ({len(copies)}) without reuse")
    # The ids already in the snapshot (its kept units', the copied files') go through the
    # shuffle only where today's rows may hold them, once today's are gathered: worth it when
    # they outnumber today's rows (input bytes and rows as the manifests count them).
    held_bytes = sum(unit.get("size", 0) for unit in work.kept.values()) + copied_bytes
    held_rows = sum(unit.get("rows", 0) for unit in work.kept.values()) + sum(
        c.skipped.rows for c in copies)
    gather = worth_gathering(held_bytes, held_rows, read_bytes)
    diff = dataclasses.replace(diff, touched_files=tuple(
        f for f in previous.files if f[0] in touched) if previous else (), touched=touched,
        gather_today=bool(seen or copies) and gather)
    ds, graph_facts = build_nightly_dataset(plan, diff, copies)
    facts = {"reused_previous": diff.reuse, "reembed_reason": diff.reembed_reason,
             "tokenizer_sha256": identity.get("tokenizer_sha256"),
             "units_touched": len(copies), "files_copied": sum(len(c.kept) for c in copies),
             "today_ids": graph_facts["today_ids"],
             "copied_units": tuple(c.key for c in copies)}
    return ds, facts


def summarize(previous: Previous | None, snapshot: str, result: dict[str, Any],
              committed: dict[str, dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """The run summary with the snapshot's change counts and what it was compared with."""
    totals = units.Totals.of(committed.values()).counts
    counts = {k: totals[k] for k in ("rows_new", "rows_changed", "rows_unchanged", "rows_reused")}
    prev_rows = previous.rows if previous else 0
    rows_out = result["rows_embedded"]
    model = result["model"]
    carried = sum(1 for unit in committed.values() if unit.get("carried_from"))
    # The run counts the units carried now as kept from an earlier run (resumed); they were
    # committed by this one.
    now = facts.get("carried_now", 0)
    counted = result["units"]
    return result | counts | {
        "units": counted | {"carried": carried, "resumed": counted["resumed"] - now,
                            "committed_now": counted["committed_now"] + now,
                            # units of several files, some changed: the others were copied
                            "touched": facts.get("units_touched", 0),
                            "files_copied": facts.get("files_copied", 0),
                            # units whose rows the shuffle scattered, gathered before
                            # their commit (by this attempt)
                            "gathered": facts.get("units_gathered", 0)},
        "snapshot": snapshot,
        "previous_snapshot": previous.name if previous else None,
        "rows_out": rows_out,  # rows in the snapshot
        # Rows the encoder ran on for this snapshot; the others' vectors were reused.
        "rows_embedded": rows_out - counts["rows_reused"],
        "rows_deleted": prev_rows - counts["rows_changed"] - counts["rows_unchanged"],
        "reused_previous": facts.get("reused_previous", False),
        # Today's distinct ids, gathered before the diff (None: not gathered; see
        # pipeline/cluster/graph.py::gather_today).
        "today_ids_gathered": facts.get("today_ids"),
        "reembed_reason": facts.get("reembed_reason") if previous else "first snapshot",
        "fingerprints": {"weights": model["weights_fingerprint"],
                         "tokenizer_sha256": facts.get("tokenizer_sha256"),
                         "task": result["config"]["task"], "widths": result["widths"]},
    }


def run_nightly(config: RunConfig,
                adapt: Callable[[JobSpec], JobSpec] | None = None) -> dict[str, Any]:
    """One nightly run: a new (or the unfinished) snapshot, then ``_LATEST``, then pruning.

    ``adapt``: a benchmark's change to the night's job spec (the GPU-rate stand-in encoder,
    ``pipeline/bench/rate.py::with_rate_encoder``); no option of the command sets it."""
    if config.on_duplicate == "keep-all":
        raise ValueError("nightly keys rows by id, so --on-duplicate keep-all cannot be used")
    if HASH_COLUMN in config.keep_columns:
        raise ValueError(f"--keep-columns names {HASH_COLUMN!r}, the snapshot's own column; "
                         "rename that column")
    root_uri = config.output.rstrip("/")
    found = prepare_output(root_uri, config.storage_options)  # writable; no bucket is created
    # A write of _LATEST cut short (a night killed while publishing) leaves its temporary.
    stale = [f for f in found if is_latest_temporary(f)]
    remove_files(root_uri, stale, config.storage_options)
    found = [f for f in found if f not in stale]
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
        result = _snapshot(config, fs, root, root_uri, name, previous, adapt)
    except units.ResumeRefused as err:
        # Today's input or settings differ from the unfinished run's: a scheduled job must
        # not stop there. That snapshot is left alone and deleted by the next pruning.
        log.warning("the unfinished snapshot %s cannot be resumed (%s); starting a new one",
                    name, err)
        name = new_snapshot_name(set(snapshots) | {name} | ({latest} if latest else set()))
        result = _snapshot(config, fs, root, root_uri, name, previous, adapt)
    if not result["reconciled"]:
        log.error("snapshot %s does not reconcile; %s still names %s", name, LATEST, latest)
        return result
    publish(fs, root, name)
    gone = prune(fs, root, name, config.keep_snapshots)
    log.info("published %s/%s (%s); deleted %d older snapshot(s)", root_uri, name, LATEST, len(gone))
    return result | {"snapshots_deleted": gone}


def _snapshot(config: RunConfig, fs, root: str, root_uri: str, name: str,
              previous: Previous | None,
              adapt: Callable[[JobSpec], JobSpec] | None = None) -> dict[str, Any]:
    """Run into the snapshot folder ``name``. A snapshot that failed or did not reconcile
    loses its ``_summary.json``, so that it is never taken for a complete one (it is resumed
    by the next run, or pruned)."""
    summary = f"{root}/{name}/{SUMMARY_NAME}"
    try:
        spec = nightly_spec(previous, name)
        result = run(dataclasses.replace(config, output=f"{root_uri}/{name}", overwrite=False),
                     adapt(spec) if adapt else spec)
    except RunFailed:
        if fs.exists(summary):
            fs.rm(summary)
        raise
    if not result["reconciled"] and fs.exists(summary):
        fs.rm(summary)
    return result
