"""The ``run`` job, and the phases every job goes through.

``run(config)`` is what ``python -m pipeline run`` and the ``ray job submit`` entrypoints call.
A job is ``run`` with a :class:`JobSpec`: plain values and functions that change what the
output holds, the graph and the summary (``nightly`` and ``enrich`` build their own specs;
nothing is subclassed). Every job goes through the same four phases:

1. :func:`resume_state`: pre-flight (inputs, output, model) and what an earlier run of the same
   output committed; before Ray starts, so a setup mistake costs seconds.
2. :func:`plan`: the :class:`~pipeline.plan.RunPlan` for the cluster, the run's identity, the
   units kept from an earlier run (their leftovers deleted), the units to do.
3. :func:`execute`: the job's graph on Ray Data; each unit is committed as its rows come out.
4. :func:`finish`: units that produced no row, stray files, ``_summary.json``, the reject check.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

from .. import summary, units
from ..cluster.expert_groups import new_group_name
from ..cluster.gather import UnitGatherer
from ..cluster.graph import Dataset, build_dataset, limit_resources, write_records
from ..cluster.session import configure_progress, lost_nodes, ray_session
from ..config import RunConfig
from ..errors import RunFailed, root_cause
from ..io.readers import count_rows
from ..io.storage import (SUMMARY_NAME, InputFile, is_local, open_filesystem, own_files,
                          publish_json, remove_files)
from ..io.writers import OutputSpec
from ..model.cpu import cpu_features, has_bf16_matmul
from ..plan import Cluster, ModelInfo, RunPlan, plan_run
from ..preflight import Inputs, check_inputs, check_output, load_model_info

log = logging.getLogger("pipeline")

# The reject fraction is judged early only once this many rows came out; always at the end.
EARLY_REJECT_CHECK_ROWS = 10_000
PROGRESS_LOG_S = 30.0
COUNT_THREADS = 16  # row counts of units that produced no row, read at once


@dataclasses.dataclass(frozen=True)
class Work:
    """What a job's graph is built from: the plan (its files: the units to do), the run's
    identity, the cluster's CPUs, and the units committed earlier (kept)."""

    plan: RunPlan
    identity: dict[str, Any]
    cpus: float
    kept: dict[str, dict[str, Any]]


def plain_graph(work: Work) -> tuple[Dataset, dict[str, Any]]:
    """Read -> tokenize -> encode -> write; no facts for the summary."""
    return build_dataset(work.plan), {}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job changes in a run. ``graph`` returns the dataset and facts (a dict) that
    ``summarize(result, committed, facts)`` may add to the summary."""

    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # extra identity fields
    output: Callable[[OutputSpec], OutputSpec] = lambda spec: spec  # the output's columns
    graph: Callable[[Work], tuple[Dataset, dict[str, Any]]] = plain_graph
    summarize: Callable[[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]],
                        dict[str, Any]] = lambda result, committed, facts: result
    input_files: tuple[InputFile, ...] | None = None  # listed by the job (Iceberg), else None
    # Small files grouped into units of several (units.group_units); off where each input
    # file must be a unit of its own (the enrichment writes one output file per input file).
    group_files: bool = True
    # Manifests whose units the grouping plans again with the same files when all of them
    # are listed (after those of the output itself): nightly passes the previous snapshot's.
    group_hints: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # Units this run need not read: ``carry(Carry)`` returns the manifests of the units it
    # committed at the output without running them (their files put there, e.g. copied),
    # and facts for the summary. Nightly carries units unchanged since the previous snapshot.
    carry: Callable[["Carry"], tuple[dict[str, dict[str, Any]], dict[str, Any]]] | None = None
    # Units whose rows the graph scattered over many part files are gathered before they are
    # committed (pipeline/cluster/gather.py): nightly's shuffle deals a unit's rows to about
    # one write per bucket. The graph's facts may name units never to gather
    # (``"copied_units"``: touched ones, whose copy and graph rows are two parts by design).
    gather: bool = False


@dataclasses.dataclass(frozen=True)
class Carry:
    """What a job's ``carry`` decides from: the run's identity, the units to do, the output."""

    identity: dict[str, Any]
    todo: tuple[InputFile, ...]
    fs: Any
    out_path: str
    kept: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # resumed


RUN = JobSpec()


@dataclasses.dataclass(frozen=True)
class Setup:
    """Phase 1's result: the checked inputs and model, and the output's earlier state."""

    inputs: Inputs
    previous: list[str]  # the pipeline's files already at the output
    model: ModelInfo
    fs: Any
    out_path: str
    state: units.OutputState


@dataclasses.dataclass(frozen=True)
class Planned:
    """Phase 2's result: the plan (its files: the units to do), identity, kept units (an
    earlier run's, and those the job carried), the carry's facts for the summary."""

    plan: RunPlan
    identity: dict[str, Any]
    keep: dict[str, dict[str, Any]]
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Executed:
    """Phase 3's result: the committed and open units, the wall time, the graph's facts."""

    tracker: units.Tracker
    wall_s: float
    facts: dict[str, Any]
    first_record_s: float | None = None  # from the graph's start to the first write record
    nodes_lost: tuple[dict[str, str], ...] = ()  # nodes that left the cluster during the run


def run(config: RunConfig, spec: JobSpec = RUN) -> dict[str, Any]:
    """Embed ``config.input`` into ``config.output``; returns the run summary.

    An output holding an earlier run of the same settings is resumed: its committed units are
    kept and skipped, everything else there is deleted and redone. Setup mistakes raise the
    pre-flight's errors before any work; a failure once the run has started raises
    :class:`~pipeline.errors.RunFailed`.
    """
    t0 = time.perf_counter()
    setup = resume_state(config, spec)
    preflight_s = time.perf_counter() - t0
    group = new_group_name()
    with ray_session(config, ep_group=group if config.expert_parallel > 1 else None) as cluster:
        t1 = time.perf_counter()
        planned = plan(config, setup, cluster, spec, group)
        plan_s = time.perf_counter() - t1
        executed = execute(config, setup, planned, spec, cluster)
    first = executed.first_record_s
    driver = {"preflight_s": round(preflight_s, 3), "plan_s": round(plan_s, 3),
              "first_write_s": None if first is None else round(first, 3)}
    return finish(config, setup, planned, executed, spec, driver)


def resume_state(config: RunConfig, spec: JobSpec) -> Setup:
    """Pre-flight, then what the output holds; refuses a resume of other settings (before
    Ray starts: the encoder's dtype is known once it has)."""
    inputs = check_inputs(config, None if spec.input_files is None else list(spec.input_files))
    previous = check_output(config)
    model = load_model_info(config)
    fs, out_path = open_filesystem(config.output, config.storage_options)
    state = units.load_state(fs, out_path, previous)
    if spec.group_files:
        committed = {} if config.overwrite else dict(state.units)
        hints = committed | {k: v for k, v in spec.group_hints.items() if k not in committed}
        inputs = dataclasses.replace(inputs, files=units.group_units(
            inputs.files, config.unit_bytes, hints))
    log.info("inputs: %d %s file(s) in %d unit(s); model %s (%s)",
             len({m.uri for f in inputs.files for m in f.files}),  # a file's slices: one file
             inputs.files[0].format if inputs.files else "?", len(inputs.files),
             model.model_id, model.fingerprint)
    if not config.overwrite:
        identity = units.run_identity(config, None, model, inputs) | dict(spec.identity)
        units.resumable_units(state, identity, inputs.files, config.output, unknown=("dtype",))
        if state.identity and state.identity.get("types"):
            # A resume keeps the types the output was written with (part files share one
            # schema), whatever the first shard of today's input looks like.
            id_type, keep_types = units.decode_types(state.identity["types"])
            inputs = dataclasses.replace(inputs, id_type=id_type, keep_types=keep_types)
    return Setup(inputs, previous, model, fs, out_path, state)


def plan(config: RunConfig, setup: Setup, cluster: Cluster, spec: JobSpec,
         group: str) -> Planned:
    """The plan, the identity (written to the output), the kept units and the units to do."""
    inputs = setup.inputs
    run_plan = plan_run(config, cluster, setup.model, inputs.files, inputs.id_type,
                        inputs.keep_types, group)
    run_plan = dataclasses.replace(run_plan, output=spec.output(run_plan.output))
    if run_plan.device == "cpu" and config.dtype == "auto" and has_bf16_matmul():
        log.info("computing in float32 (--dtype auto on CPU: exact parity with the reference); "
                 "this CPU multiplies bf16 natively (%s): --dtype bfloat16 is faster (1.7-1.9x "
                 "measured with AVX-512 BF16, ~3x reported with AMX), at a per-text cosine to "
                 "float32 of 0.998 or more on the benchmark's texts "
                 "(docs/running.md#compute-dtype-on-cpu)",
                 ", ".join(f for f in cpu_features() if "bf16" in f))
    identity = units.run_identity(config, run_plan.dtype, setup.model, inputs) \
        | dict(spec.identity)
    keep = kept_units(config, setup, identity)
    if keep:
        log.info("resuming %s: %d of %d unit(s) committed earlier are kept", config.output,
                 len(keep), len(inputs.files))
    units.write_identity(setup.fs, setup.out_path, identity)
    todo = tuple(f for f in inputs.files if units.unit_key(f.unit) not in keep)
    facts: dict[str, Any] = {}
    if spec.carry is not None and todo:
        carried, facts = spec.carry(Carry(identity, todo, setup.fs, setup.out_path, keep))
        if carried:
            log.info("%d of %d unit(s) carried over unchanged", len(carried), len(todo))
        keep = keep | carried
        todo = tuple(f for f in todo if units.unit_key(f.unit) not in carried)
    return Planned(dataclasses.replace(run_plan, files=todo), identity, keep, facts)


def kept_units(config: RunConfig, setup: Setup,
               identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The units an earlier run committed that this one keeps; every other file of the
    pipeline at the output (and the earlier summary) is deleted. None with ``--overwrite``."""
    if config.overwrite:
        remove_files(config.output, setup.previous, config.storage_options)
        return {}
    keep = units.resumable_units(setup.state, identity, setup.inputs.files, config.output)
    for key in units.incomplete_units(setup.state, keep):
        log.warning("unit %s is committed but some of its files are missing from %s; "
                    "embedding it again", keep.pop(key)["uri"], config.output)
    stale = units.stray_files(setup.fs, setup.state, keep)
    stale += [p for p in setup.previous if p.endswith("/" + SUMMARY_NAME)]
    remove_files(config.output, stale, config.storage_options)
    return keep


def execute(config: RunConfig, setup: Setup, planned: Planned, spec: JobSpec,
            cluster: Cluster) -> Executed:
    """Run the job's graph over the units to do, committing each unit as it completes."""
    fs, out_path = setup.fs, setup.out_path

    def publish(unit: dict[str, Any]) -> None:
        publish_json(fs, units.manifest_path(out_path, unit["unit"]), unit)

    gatherer = UnitGatherer(publish, planned.plan.output_uri, config.storage_options,
                            planned.plan.output.rows_per_file()) if spec.gather else None
    tracker = units.Tracker(planned.plan.files,
                            commit=gatherer.commit if gatherer else publish)
    configure_progress(config.progress)
    t0, facts, first_record_s = time.perf_counter(), dict(planned.facts), None
    if planned.plan.files:
        limit_resources(planned.plan)  # before the dataset is made: it copies the context
        ds, graph_facts = spec.graph(Work(planned.plan, planned.identity, cluster.cpus,
                                          planned.keep))
        facts |= graph_facts
        if gatherer:
            gatherer.skip = frozenset(graph_facts.get("copied_units", ()))
        records = write_records(ds)
        try:
            first = consume(records, tracker, config)
            if gatherer:
                gather(gatherer, tracker)
                facts["units_gathered"] = len(gatherer.gathered)
        except RunFailed as err:
            gone = lost_nodes(cluster)
            if gone:  # a likely cause (the error itself comes first: it may be another)
                raise RunFailed(f"{err}; meanwhile {describe_lost(gone)}") from err
            raise
        finally:
            if gatherer:  # a failed run's gatherings stop: none may write after it
                gatherer.cancel()
            records.close()  # stop Ray Data's iterator now, while Ray is still up
        first_record_s = None if first is None else first - t0
    gone = lost_nodes(cluster)
    if gone:
        log.warning("%s; what they held was run again elsewhere, and every unit was committed "
                    "once", describe_lost(gone))
    return Executed(tracker, time.perf_counter() - t0, facts, first_record_s, tuple(gone))


def gather(gatherer: UnitGatherer, tracker: units.Tracker) -> None:
    """Wait for the units being gathered (committed as each is done); the tracker then
    holds their gathered files."""
    try:
        gatherer.drain()
    except Exception as err:  # noqa: BLE001 - reported whole, with its type (as consume)
        cause = root_cause(err)
        raise RunFailed(f"the run failed: {type(cause).__name__}: {cause}") from err
    tracker.committed.update(gatherer.gathered)


NODES_NAMED = 5  # in a message; the summary lists up to summary.MAX_NODES_LOST


def describe_lost(nodes: list[dict[str, str]]) -> str:
    named = "; ".join(f"{n['node_id'][:12]} at {n['address']}: {n['reason']}"
                      for n in nodes[:NODES_NAMED])
    more = f"; and {len(nodes) - NODES_NAMED} more" if len(nodes) > NODES_NAMED else ""
    return f"{len(nodes)} node(s) left the cluster during the run ({named}{more})"


def finish(config: RunConfig, setup: Setup, planned: Planned, executed: Executed,
           spec: JobSpec, driver: dict[str, Any] | None = None) -> dict[str, Any]:
    """Account for every unit, delete what is not output, write and check the summary
    (``driver``: the driver's phase times, for the summary's ``driver_s``)."""
    tracker = executed.tracker
    unseen = {}
    keys = tracker.unseen()
    # Many empty inputs must not cost one request after another (a footer or file read each).
    with ThreadPoolExecutor(max_workers=COUNT_THREADS) as pool:
        counts = pool.map(lambda k: count_rows(tracker.files[k], config.storage_options), keys)
        for key, rows in zip(keys, counts):
            if tracker.finish_empty(key, rows) is None:
                unseen[tracker.files[key].unit] = rows
    committed = planned.keep | tracker.committed
    # Files of units left open, and of write attempts Ray retried, are not output.
    fs, out_path = setup.fs, setup.out_path
    done = units.OutputState(out_path, planned.identity, committed, own_files(fs, out_path),
                             is_local(fs))
    remove_files(config.output, units.stray_files(fs, done, committed), config.storage_options)
    # The full file lists first: the summary (written last) names them.
    base = str(config.output).rstrip("/")
    publish_json(fs, f"{out_path.rstrip('/')}/{summary.FILES_NAME}", summary.file_lists(
        (f for u in committed.values() for f in u["files"]), base, config.to_dict()))
    result = summary.build(
        committed=committed, resumed=planned.keep, open_units=list(tracker.open.values()),
        unseen_rows=unseen, wall_s=executed.wall_s, config=config.to_dict(),
        model=setup.model.describe() | summary.model_fields(planned.plan),
        input_files=len({m.uri for f in setup.inputs.files for m in f.files}),
        units_total=len(setup.inputs.files),
    )
    result |= summary.nodes_lost(executed.nodes_lost)
    result = spec.summarize(result, committed, executed.facts)
    if driver is not None:
        result["driver_s"] = driver
    # A run that failed writes no summary: readers take an output once its summary exists.
    if result["rows_in"] and result["reject_fraction"] > config.max_reject_fraction:
        raise RunFailed(
            f"{result['rows_rejected']} of {result['rows_in']} rows were rejected "
            f"({result['reject_fraction']:.1%}), more than --max-reject-fraction "
            f"{config.max_reject_fraction:g}; reasons: {result['reject_reasons']} (see "
            f"{config.output.rstrip('/')}/_rejects/)")
    write_summary(config, result)
    return result


def consume(records: Iterable[dict[str, Any]], tracker: units.Tracker,
            config: RunConfig) -> float | None:
    """Take the write records as they come, committing units; stop on ``--on-bad-rows fail``
    or too many rejects early on. Returns when the first record came (``perf_counter``)."""
    rows = rejected = 0
    last_log, first = time.monotonic(), None
    try:
        for record in records:
            first = first or time.perf_counter()
            if config.on_bad_rows == "fail" and record["rows_rejected"]:
                row, reason = record["first_reject"]
                raise RunFailed(f"row {row} of {record['source']} was rejected "
                                f"(--on-bad-rows fail): {reason}")
            tracker.add(record)
            rows, rejected = rows + record["rows"], rejected + record["rows_rejected"]
            if rows >= EARLY_REJECT_CHECK_ROWS and rejected > config.max_reject_fraction * rows:
                raise RunFailed(
                    f"{rejected} of the first {rows} rows were rejected, more than "
                    f"--max-reject-fraction {config.max_reject_fraction:g}; stopping early "
                    f"(the last: {record['first_reject']} in {record['source']})")
            if time.monotonic() - last_log > PROGRESS_LOG_S:
                last_log = time.monotonic()
                log.info("%d of %d unit(s) committed; %d rows out this run",
                         len(tracker.committed), len(tracker.files), rows)
    except RunFailed:
        raise
    except units.RowsDuplicated as err:
        raise RunFailed(f"the run stopped to keep the output exact: {err}") from err
    except Exception as err:  # noqa: BLE001 - reported whole, with its type
        cause = root_cause(err)
        raise RunFailed(f"the run failed: {type(cause).__name__}: {cause}") from err
    return first


def write_summary(config: RunConfig, result: dict[str, Any]) -> str:
    """Write ``<output>/_summary.json``, whole or not at all."""
    fs, path = open_filesystem(config.output, config.storage_options)
    return publish_json(fs, f"{path.rstrip('/')}/{SUMMARY_NAME}", result)
