"""Ray for one job: connect to a cluster or start a local Ray, what the cluster holds, and
Ray Data's settings for the run.

A job that finds Ray already initialised (a driver that runs several jobs, the enrich job's
staging run) uses it as it is and leaves it running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

import ray
from ray.data import DataContext

from ..config import RunConfig
from ..plan import Cluster, local_cpus
from .expert_groups import release_groups

log = logging.getLogger("pipeline")


def init_ray(config: RunConfig) -> bool:
    """Connect to ``--address`` or ``$RAY_ADDRESS``, else start a local Ray; True if started."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
        return True
    # Lazy: torch only to count this machine's GPUs, when a local Ray is started.
    import torch

    gpus = torch.cuda.device_count()
    cpus = local_cpus(config, gpus, os.cpu_count() or 1)
    # address="local": a Ray of the job's own, sized for it, even where a `ray start` cluster
    # runs on this machine (ray.init would otherwise join that one, and refuse the sizes).
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, **quiet)
    return True


def cluster() -> Cluster:
    """The connected cluster's logical CPUs and GPUs, and its largest node's."""
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [n["Resources"] for n in alive]
    return Cluster(cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                   node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=None),
                   node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=None),
                   node_ids=tuple(sorted(n["NodeID"] for n in alive)))


# Ray's reason for a node's end that is no loss: the autoscaler ended it because it was idle.
IDLE_DRAIN = "AUTOSCALER_DRAIN_IDLE"


def lost_nodes(started: Cluster) -> list[dict[str, str]]:
    """The nodes alive when the run started that are gone now (a spot preemption, a crash,
    a node stopped), not counting those the autoscaler ended as idle: their ID, address and
    Ray's reason. Ray runs again the tasks they held and restarts their actors elsewhere; the
    summary names them so that a run that finished anyway says what it went through. Nodes
    that joined after the start are not followed. A failure to ask Ray gives none (this is a
    report, never a reason to fail a run)."""
    if not started.node_ids or not ray.is_initialized():
        return []
    try:
        now = {n["NodeID"]: n for n in ray.nodes()}
    except Exception as err:  # noqa: BLE001 - a report only
        log.debug("could not list the cluster's nodes: %s", err)
        return []
    gone = []
    for node in started.node_ids:
        state = now.get(node, {})
        if state.get("Alive") or state.get("DeathReason") == IDLE_DRAIN:
            continue
        gone.append({"node_id": node, "address": state.get("NodeManagerAddress", "?"),
                     "reason": state.get("DeathReasonMessage") or state.get("DeathReason")
                     or "no longer in the cluster"})
    return gone


@contextlib.contextmanager
def ray_session(config: RunConfig, ep_group: str | None = None) -> Iterator[Cluster]:
    """Ray for the length of a job: started (or joined) on entry; on exit the job's
    expert-parallel placement groups (named ``ep_group-...``) are released, and a Ray this
    call started is shut down."""
    started = init_ray(config)
    try:
        yield cluster()
    finally:
        if ep_group and ray.is_initialized():
            release_groups(ep_group)
        if started:
            ray.shutdown()


def configure_progress(progress: str) -> None:
    """Ray Data's progress bars (``--progress``) and the messages it prints for a run."""
    ctx = DataContext.get_current()
    shown = progress == "on" or (progress == "auto" and sys.stderr.isatty())
    ctx.enable_progress_bars = shown
    # A stage's own exception, not Ray Data's UserCodeException without it (see root_cause).
    ctx.raise_original_map_exception = True
    # Messages that mean nothing to a user: the plan printed at each dataset's start, its
    # INFO lines (the run's own log and report say what happened), and a warning that the
    # progress bars they did not ask for are off. With --progress on, Ray Data says it all.
    ctx.print_on_execution_start = shown
    logging.getLogger("ray.data").setLevel(logging.INFO if shown else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.NOTSET if shown else logging.ERROR)
