"""Expert-parallel encoder groups on Ray (``--expert-parallel N``).

One encoder replica of the pipeline becomes a group of ``N`` rank actors in one placement
group (STRICT_PACK: one node, so NCCL stays on NVLink/PCIe) forming one torch.distributed
process group, NCCL on GPUs and gloo on CPUs. Each rank loads the dense weights and its
``E/N`` experts of every MoE layer (``pipeline/model/expert_parallel.py`` has the math).

The Ray Data actor of the encode stage (:class:`~pipeline.stages.embed.EncodeStage`) is given
a :class:`RankGroup` as its engine (``pipeline/cluster/graph.py``) and only coordinates: for every window it plans token-budgeted batches,
deals them to the ranks balanced by work, and calls every rank at once with its batches and
the common step count, so the ranks make the same collectives in the same order (a rank with
fewer batches takes part in the remaining steps' exchanges with nothing to send).

Failures: every collective times out (``timeout_s``) instead of hanging, and the coordinator
stops waiting as soon as one rank's call fails (a killed rank fails at once). The whole group
is then torn down (actors killed, placement group removed) and a fresh one retries the window;
after ``restarts`` failures the error goes to Ray Data and the run fails, to be resumed
from its committed units. Nothing of a failed window is written, so no row is lost or doubled.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import (get_placement_group, placement_group,
                                      placement_group_table, remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..batching import attention_slots, deal_groups, default_max_tokens, plan_batches
from ..config import POOLED
from ..errors import root_cause
from ..model.cpu import CPU_WORKER_ENV, default_threads, set_threads
from ..tokenize import TokenizedBatch

log = logging.getLogger("pipeline")

DEFAULT_TIMEOUT_S = 300.0  # one collective, and the rendezvous
START_TIMEOUT_S = 600.0  # placement group resources, model loading
DEFAULT_RESTARTS = 2


class GroupFailed(RuntimeError):
    """A rank of an expert-parallel group failed or timed out; the group was torn down."""


class ExpertRank:
    """One rank of a group (a Ray actor): its share of the experts, in step with the others."""

    def __init__(self, rank: int, world_size: int, threads: int | None) -> None:
        if threads:
            set_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.embedder = None

    def rendezvous_address(self) -> str:
        """``tcp://<this node>:<free port>`` (called on rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str, load: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Join the process group, then load the dense weights and this rank's experts."""
        # Lazy: these import torch, after this process's thread count is set (__init__).
        from ..embedder import load_worker_embedder, resolve_device
        from ..model.expert_parallel import init_group
        from ..model.layers import uses_varlen

        device = resolve_device(load["device"])
        placement = init_group(self.rank, self.world_size, init_method, device, timeout_s)
        self.embedder = load_worker_embedder(**load, placement=placement)
        enc = self.embedder.encoder
        return {"pid": os.getpid(), "max_tokens_per_batch": self.embedder.max_tokens_per_batch,
                "varlen": uses_varlen(enc.device, enc.dtype),
                "device": str(enc.device), "dtype": str(enc.dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in enc.parameters())}

    def encode(self, flat_ids: np.ndarray, lengths: np.ndarray, groups: list[np.ndarray],
               steps: int, dims: tuple[int, ...], pooled: bool = False) -> dict[int, np.ndarray]:
        batch = TokenizedBatch(flat_ids, lengths, np.zeros(len(lengths), bool))
        return self.embedder.embed_tokenized(batch, dims, groups, steps=steps, pooled=pooled)


class RankGroup:
    """``size`` :class:`ExpertRank` actors in one placement group, used like an ``Embedder``
    (``plan``, ``attention_slots``, ``embed_tokenized``) by the encode stage."""

    def __init__(self, size: int, load: dict[str, Any], *, name: str = "pipeline-ep",
                 threads: int | None = None, replicas: int = 1, rank_cpus: float = 1.0,
                 timeout_s: float = DEFAULT_TIMEOUT_S, restarts: int = DEFAULT_RESTARTS) -> None:
        self.size, self.load, self.name = size, dict(load), name
        self.cuda = load["device"] == "cuda"
        if threads is None and not self.cuda:
            threads = default_threads(replicas * size)
        self.threads, self.rank_cpus = threads, rank_cpus
        self.timeout_s, self.restarts_left = timeout_s, restarts
        self.ranks: list = []
        self.pg = None
        self.info: list[dict[str, Any]] = []
        # Started on the first window, inside the retry loop, so that a failed first start
        # is retried like any later failure (a failure in __init__ would end the run).

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Reserve the bundles, start the ranks, rendezvous and load (raises GroupFailed)."""
        release_orphans(self.name)
        bundle = {"CPU": self.rank_cpus} | ({"GPU": 1.0} if self.cuda else {})
        owner = ray.get_runtime_context().get_actor_id() or "driver"
        self.pg = placement_group([bundle] * self.size, strategy="STRICT_PACK",
                                  name=f"{self.name}-{owner}-{uuid.uuid4().hex[:8]}")
        try:
            ray.get(self.pg.ready(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:  # the caller stops the group
            raise GroupFailed(
                f"an expert-parallel group of {self.size} rank(s) needs {self.size} x {bundle} "
                f"on one node; the cluster had no room for {START_TIMEOUT_S:.0f} s (use fewer "
                "--expert-parallel ranks or --encoder-replicas, or bigger nodes)") from None
        actor = ray.remote(ExpertRank)
        options = {"num_cpus": self.rank_cpus, "num_gpus": 1 if self.cuda else 0,
                   "max_restarts": 0,
                   "runtime_env": {"env_vars": {} if self.cuda else CPU_WORKER_ENV}}
        self.ranks = [
            actor.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=r)).remote(r, self.size, self.threads)
            for r in range(self.size)
        ]
        init_method = self._wait([self.ranks[0].rendezvous_address.remote()], "starting")[0]
        calls = [rank.setup.remote(init_method, self.load, self.timeout_s) for rank in self.ranks]
        self.info = self._wait(calls, "starting")
        log.info("expert-parallel group %s: %d rank(s) on %s, %d parameters each (pids %s)",
                 self.pg.id.hex()[:8], self.size, self.info[0]["device"],
                 self.info[0]["parameters"], [i["pid"] for i in self.info])

    def stop(self) -> None:
        """Kill every rank and release the placement group (idempotent)."""
        if not ray.is_initialized():  # the interpreter is exiting: Ray took them down
            self.ranks, self.pg = [], None
            return
        for rank in self.ranks:
            try:
                ray.kill(rank, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.ranks = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
            self.pg = None

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- the Embedder interface the encode stage uses ------------------------------------------

    @property
    def max_tokens_per_batch(self) -> int:
        if self.info:
            return self.info[0]["max_tokens_per_batch"]
        return self.load["max_tokens_per_batch"] or default_max_tokens(
            "cuda" if self.cuda else "cpu", self.load["dtype"])

    def plan(self, lengths) -> list[np.ndarray]:
        return plan_batches(lengths, self.max_tokens_per_batch)

    def attention_slots(self, lengths, groups: list[np.ndarray]) -> np.ndarray:
        varlen = bool(self.info and self.info[0]["varlen"])  # as the ranks run attention
        return attention_slots(lengths, groups, varlen)

    def embed_tokenized(self, batch, dims: tuple[int, ...], groups: list[np.ndarray],
                        pooled: bool = False) -> dict[int, np.ndarray]:
        """Like ``Embedder.embed_tokenized``, the groups spread over the ranks. A failed group
        is replaced and the window retried, ``restarts`` times in the group's life."""
        while True:
            try:
                if not self.ranks:
                    self.start()
                return self._embed(batch, dims, groups, pooled)
            except GroupFailed as err:
                self.stop()
                if self.restarts_left <= 0:
                    raise
                self.restarts_left -= 1
                log.warning("%s; starting a new group and retrying the window (%d restart(s) "
                            "left)", err, self.restarts_left)

    def _embed(self, batch, dims, groups_G, pooled: bool) -> dict[int, np.ndarray]:
        """The window's batches dealt to the R ranks (``dealt_R``: each rank's batch indices),
        one call per rank with the common step count; vectors back in the window's order."""
        offsets = batch.offsets
        dealt_R = deal_groups(batch.lengths, groups_G, self.size)
        steps = max(len(d) for d in dealt_R)
        calls, rows = [], []
        for rank, mine in zip(self.ranks, dealt_R):
            members = [groups_G[i] for i in mine]
            seqs = np.concatenate(members) if members else np.zeros(0, np.int64)
            flat_T = np.concatenate([batch.ids[offsets[i]: offsets[i + 1]] for i in seqs]) \
                if len(seqs) else np.zeros(0, np.int32)
            # The rank's groups_G, as positions in its own sub-batch.
            starts = np.cumsum([0] + [len(g) for g in members])
            local = [np.arange(starts[j], starts[j + 1]) for j in range(len(members))]
            calls.append(rank.encode.remote(flat_T, batch.lengths[seqs], local, steps, dims,
                                            pooled))
            rows.append(seqs)
        results = self._wait(calls, "encoding")
        keys = [*dims, POOLED] if pooled else list(dims)
        out_MW = {k: np.empty((len(batch.lengths), results[0][k].shape[1]), np.float32)
                  for k in keys}
        for seqs, vectors in zip(rows, results):
            for k in keys:
                out_MW[k][seqs] = vectors[k]
        return out_MW

    def _wait(self, calls: list, doing: str) -> list:
        """Every call's result, in order; raises GroupFailed as soon as any call fails."""
        index = {ref: i for i, ref in enumerate(calls)}
        results: list = [None] * len(calls)
        pending = list(calls)
        t0 = time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - reported with the rank and its cause
                    cause = root_cause(err)
                    raise GroupFailed(
                        f"expert-parallel rank {index[ref]} of {self.size} failed while "
                        f"{doing} after {time.monotonic() - t0:.1f} s: "
                        f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
                    ) from err
        return results


def _groups(prefix: str) -> list:
    """``(group, name)`` of the placement groups named ``prefix-...`` still holding resources
    (one removed meanwhile, by the encode actor that made it, is left out)."""
    found = []
    for info in placement_group_table().values():
        name = info.get("name", "")
        if name.startswith(prefix + "-") and info.get("state") != "REMOVED":
            try:
                found.append((get_placement_group(name), name))
            except ValueError:  # "Failed to look up placement group": removed since the table
                continue
    return found


def _actor_dead(actor_id: str) -> bool:
    """Whether the GCS knows actor ``actor_id`` (hex) as dead.

    The one private Ray API of the project: Ray has no public call that looks an actor up by
    id without the dashboard's state API (``ray.util.state`` needs the dashboard, which local
    runs do not start). Unknown actors count as alive (their group is released at the end).
    """
    from ray._private.state import actors  # private; see the docstring

    try:
        return actors(actor_id=actor_id).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - unknown to the GCS: leave it to the end of the run
        return False


def release_orphans(prefix: str) -> int:
    """Remove this run's placement groups whose encode actor died (Ray Data then starts a new
    one): their ranks died with it, but the group would hold its CPUs/GPUs until the job ends.
    """
    removed = 0
    for pg, name in _groups(prefix):
        owner = name[len(prefix) + 1:].rsplit("-", 1)[0]
        if owner != "driver" and _actor_dead(owner):
            remove_placement_group(pg)
            removed += 1
    return removed


def release_groups(prefix: str) -> int:
    """Remove a run's leftover placement groups (the encode actors that made them are gone
    when the dataset finishes, but their groups live as long as the job)."""
    leftovers = _groups(prefix)
    for pg, _ in leftovers:
        remove_placement_group(pg)
    return len(leftovers)


def new_group_name() -> str:
    return f"pipeline-ep-{uuid.uuid4().hex[:12]}"
