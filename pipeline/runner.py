"""Run one embedding job: pre-flight, Ray, the graph, the summary.

``run(config)`` is what ``python -m pipeline run`` and the job entrypoints call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import ray

from . import summary, units
from .config import RunConfig
from .ep import new_group_name, release_groups
from .graph import STATS, build_dataset, limit_resources
from .io.storage import (SUMMARY_NAME, count_rows, is_local, open_for_publish, open_filesystem,
                         own_files, remove_files)
from .plan import Cluster, local_cpus, plan_run
from .preflight import check_inputs, check_output, load_model_info

log = logging.getLogger("pipeline")


class RunFailed(RuntimeError):
    """The run started and then failed (a stage raised, an actor died, storage failed, too
    many rows rejected)."""


# The reject fraction is judged early only once this many rows came out; always at the end.
EARLY_REJECT_CHECK_ROWS = 10_000
PROGRESS_LOG_S = 30.0


class PlainRun:
    """The hooks a job uses to change :func:`run` (see ``pipeline/nightly.py``): extra identity
    fields, output columns, the graph, and the summary."""

    def identity(self) -> dict[str, Any]:
        return {}

    def output_spec(self, spec):
        return spec

    def dataset(self, plan, identity: dict[str, Any], cpus: float,
                kept: dict[str, dict[str, Any]]):
        """The graph over ``plan.files`` (the units to do; ``kept``: those committed earlier)."""
        return build_dataset(plan)

    def summarize(self, result: dict[str, Any], committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return result

    def input_files(self):
        """The input files when the job lists them itself (an Iceberg snapshot's), else None."""
        return None


def run(config: RunConfig, variant: PlainRun | None = None) -> dict[str, Any]:
    """Embed ``config.input`` into ``config.output``; returns the run summary.

    An output holding an earlier run of the same settings is resumed: its committed units are
    kept and skipped, everything else there is deleted and redone. Setup mistakes raise the
    pre-flight's errors before any work; a failure once the run has started raises
    :class:`RunFailed`.
    """
    variant = variant or PlainRun()
    inputs = check_inputs(config, variant.input_files())
    previous = check_output(config)
    model = load_model_info(config)
    fs, out_path = open_filesystem(config.output, config.storage_options)
    state = units.load_state(fs, out_path, previous)
    log.info("inputs: %d %s file(s); model %s (%s)", len(inputs.files),
             inputs.files[0].format if inputs.files else "?", model.model_id, model.fingerprint)
    if not config.overwrite:  # before Ray starts; the encoder's dtype is known once it has
        units.resumable_units(state, run_identity(config, None, model, inputs), inputs.files,
                              config.output, unknown=("dtype",))
        if state.identity and state.identity.get("types"):
            # A resume keeps the types the output was written with (part files share one
            # schema), whatever the first shard of today's input looks like.
            id_type, keep_types = units.decode_types(state.identity["types"])
            inputs = dataclasses.replace(inputs, id_type=id_type, keep_types=keep_types)
    started = init_ray(config)
    try:
        resources = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        cluster = Cluster(cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                          node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=None),
                          node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=None))
        group_name = new_group_name()
        plan = plan_run(config, cluster, model, inputs.files, inputs.id_type, inputs.keep_types,
                        group_name)
        plan = dataclasses.replace(plan, output=variant.output_spec(plan.output))
        identity = run_identity(config, plan, model, inputs) | variant.identity()
        if config.overwrite:
            keep: dict[str, dict[str, Any]] = {}
            remove_files(config.output, previous, config.storage_options)
        else:
            keep = units.resumable_units(state, identity, inputs.files, config.output)
            for key in units.incomplete_units(state, keep):
                log.warning("unit %s is committed but some of its files are missing from %s; "
                            "embedding it again", keep.pop(key)["uri"], config.output)
            stale = units.stray_files(fs, state, keep)
            stale += [p for p in previous if p.endswith("/" + SUMMARY_NAME)]
            remove_files(config.output, stale, config.storage_options)
        if keep:
            log.info("resuming %s: %d of %d unit(s) committed earlier are kept", config.output,
                     len(keep), len(inputs.files))
        units.write_identity(fs, out_path, identity)
        todo = [f for f in inputs.files if units.unit_key(f.unit) not in keep]
        tracker = units.Tracker(todo, commit=lambda u: units.write_json(
            fs, units.manifest_path(out_path, u["unit"]), u))
        configure_progress(config.progress)
        t0 = time.perf_counter()
        if todo:
            limit_resources(plan)  # before the dataset is made: it copies the context
            ds = variant.dataset(dataclasses.replace(plan, files=tuple(todo)), identity,
                                 cluster.cpus, keep)
            consume(ds, tracker, config)
        wall = time.perf_counter() - t0
    finally:
        if ray.is_initialized() and config.expert_parallel > 1:
            release_groups(group_name)
        if started:
            ray.shutdown()
    unseen = {}
    for key in tracker.unseen():
        f = tracker.files[key]
        rows = count_rows(f, config.storage_options)
        if tracker.finish_empty(key, rows) is None:
            unseen[f.unit] = rows
    committed = keep | tracker.committed
    # Files of units left open, and of write attempts Ray retried, are not output.
    done = units.OutputState(out_path, identity, committed, own_files(fs, out_path),
                             is_local(fs))
    remove_files(config.output, units.stray_files(fs, done, committed), config.storage_options)
    result = summary.build(
        committed=committed, resumed=keep, open_units=list(tracker.open.values()),
        unseen_rows=unseen, wall_s=wall, config=config.to_dict(),
        model=model.describe() | {"device": plan.device, "dtype": plan.dtype,
                                  "encoder_replicas": plan.encode.actors,
                                  "expert_parallel": plan.encode.ranks,
                                  "tokenizer_actors": plan.tokenize.actors},
        input_files=len({f.uri for f in inputs.files}), units_total=len(inputs.files),
    )
    result = variant.summarize(result, committed)
    write_summary(config, result)
    if result["rows_in"] and result["reject_fraction"] > config.max_reject_fraction:
        raise RunFailed(
            f"{result['rows_rejected']} of {result['rows_in']} rows were rejected "
            f"({result['reject_fraction']:.1%}), more than --max-reject-fraction "
            f"{config.max_reject_fraction:g}; reasons: {result['reject_reasons']} (see "
            f"{config.output.rstrip('/')}/_rejects/)")
    return result


def run_identity(config: RunConfig, plan, model, inputs=None) -> dict[str, Any]:
    """The settings that decide what the output holds (see :data:`units.IDENTITY_FIELDS`),
    and the column types settled for it (adopted by a resume, not compared)."""
    types = units.encode_types(inputs.id_type, inputs.keep_types) if inputs else None
    return {"types": types} | {
        "model_fingerprint": model.fingerprint,
        "tokenizer_sha256": hashlib.sha256(model.tokenizer_json.encode()).hexdigest(),
        "task": config.task, "dims": list(config.dims), "output_dtype": config.output_dtype,
        "dtype": plan.dtype if plan else None, "id_column": config.id_column, "text_column": config.text_column,
        "keep_columns": list(config.keep_columns), "on_duplicate": config.on_duplicate,
        "model_id": model.model_id, "revision": model.revision,
    }


def consume(ds, tracker: units.Tracker, config: RunConfig) -> None:
    """Run the dataset, taking the write records as they come and committing units."""
    rows = rejected = 0
    last_log = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for text in batch[STATS].to_pylist():
                record = json.loads(text)
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


def root_cause(err: BaseException) -> BaseException:
    """The error a stage raised, unwrapped from Ray's task errors (their text is a traceback)."""
    seen, said = set(), err
    while id(err) not in seen:
        seen.add(id(err))
        if str(err).strip():
            said = err  # the innermost error with something to say
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err if str(err).strip() else said


def init_ray(config: RunConfig) -> bool:
    """Connect to ``--address`` or ``$RAY_ADDRESS``, else start a local Ray; True if started."""
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    import torch

    gpus = torch.cuda.device_count()
    cpus = local_cpus(config, gpus, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False)
    return True


def configure_progress(progress: str) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress == "on" or (progress == "auto" and sys.stderr.isatty())
    # A stage's own exception, not Ray Data's UserCodeException without it (see root_cause).
    ctx.raise_original_map_exception = True


def write_summary(config: RunConfig, result: dict[str, Any]) -> str:
    """Write ``<output>/_summary.json``, whole or not at all."""
    fs, path = open_filesystem(config.output, config.storage_options)
    target = f"{path.rstrip('/')}/{SUMMARY_NAME}"
    with open_for_publish(fs, target) as f:
        f.write(json.dumps(result, indent=2, sort_keys=True).encode())
    return target
