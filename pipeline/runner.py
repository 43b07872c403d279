"""Run one embedding job: pre-flight, Ray, the graph, the summary.

``run(config)`` is what ``python -m pipeline run`` and the job entrypoints call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import ray

from . import summary
from .config import RunConfig
from .graph import build_dataset, sink_for
from .io.storage import (SUMMARY_NAME, count_rows, open_for_publish, open_filesystem,
                         remove_previous)
from .plan import Cluster, local_cpus, plan_run
from .preflight import check_inputs, check_output, load_model_info

log = logging.getLogger("pipeline")


class RunFailed(RuntimeError):
    """The run started and then failed (a stage raised, an actor died, storage failed)."""


def run(config: RunConfig) -> dict[str, Any]:
    """Embed ``config.input`` into ``config.output``; returns the run summary.

    Setup mistakes raise the pre-flight's errors before any work; a failure once the run has
    started raises :class:`RunFailed`.
    """
    inputs = check_inputs(config)
    previous = check_output(config)
    model = load_model_info(config)
    log.info("inputs: %d %s file(s); model %s (%s)", len(inputs.files),
             inputs.files[0].format if inputs.files else "?", model.model_id, model.fingerprint)
    started = init_ray(config)
    try:
        resources = ray.cluster_resources()
        cluster = Cluster(cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0))
        plan = plan_run(config, cluster, model, inputs.files, inputs.id_type)
        if previous:
            remove_previous(config.output, previous, config.storage_options)
        configure_progress(config.progress)
        sink = sink_for(plan)
        t0 = time.perf_counter()
        try:
            build_dataset(plan).write_datasink(sink)
        except Exception as err:  # noqa: BLE001 - reported whole, with its type
            raise RunFailed(f"the run failed: {type(err).__name__}: {err}") from err
        wall = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    stats = sink.stats or summary.combine([])
    unseen = {f.uri: count_rows(f, config.storage_options)
              for f in inputs.files if f.uri not in stats["sources"]}
    result = summary.build(
        stats=stats, unseen_rows=unseen, wall_s=wall, config=config.to_dict(),
        model=model.describe() | {"device": plan.device,
                                  "encoder_replicas": plan.encode.actors,
                                  "tokenizer_actors": plan.tokenize.actors},
        input_files=len(inputs.files),
    )
    write_summary(config, result)
    return result


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


def write_summary(config: RunConfig, result: dict[str, Any]) -> str:
    """Write ``<output>/_summary.json``, whole or not at all."""
    fs, path = open_filesystem(config.output, config.storage_options)
    target = f"{path.rstrip('/')}/{SUMMARY_NAME}"
    with open_for_publish(fs, target) as f:
        f.write(json.dumps(result, indent=2, sort_keys=True).encode())
    return target
