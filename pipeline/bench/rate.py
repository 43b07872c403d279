"""The pipeline at a GPU's rate without a GPU: the real job with the encoder's math replaced
(``python -m pipeline.bench pipeline --encoder-rate R``; benchmark only).

:class:`RateEncoder` stands in for the encoder stage's engine (what ``EncodeStage`` is given
instead of loading a model, as the expert-parallel groups are): it does the host-side work of
``Embedder.embed_tokenized`` (a packed batch per token-budgeted group, pooled vectors written
into the output arrays) and, for the math, sleeps ``tokens / R`` seconds with the GIL released,
as a process waiting for a GPU kernel does. Its vectors are deterministic unit vectors of the
asked widths. It is set only by :func:`with_rate_encoder` (and :func:`rate_spec`), which a
benchmark applies to a job spec (a plain run's, or a night's through ``run_nightly``'s
``adapt``): no option of ``run``, ``nightly`` or ``enrich`` reaches it, and an output made with
it carries another weights fingerprint, so no run of the real encoder resumes or reuses it.

:class:`CpuSampler` adds up the CPU time of this process and of every process it started (the
local Ray: raylet, workers, actors) by what each was running when sampled (a Ray worker's
process title names its actor or task), from ``/proc`` (Linux).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import DEFAULT_MAX_TOKENS_GPU, gather_sequences, plan_batches
from ..config import POOLED
from ..model.config import load_config
from ..model.packed import PackedBatch
from ..tokenize import TokenizedBatch


class RateEncoder:
    """An encoder engine that takes ``tokens / rate`` seconds a batch and computes nothing."""

    def __init__(self, load: dict[str, Any], rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"the encoder rate must be positive tokens/s, got {rate}")
        self.rate = rate
        self.hidden_size = load_config(Path(load["model"])).hidden_size
        # A GPU encoder's budget: what the real engine would plan on CUDA.
        self.max_tokens_per_batch = load.get("max_tokens_per_batch") or DEFAULT_MAX_TOKENS_GPU
        self.math_s = 0.0  # seconds slept for the math, over this engine's life

    def plan(self, lengths) -> list[np.ndarray]:
        return plan_batches(lengths, self.max_tokens_per_batch)

    def attention_slots(self, lengths, groups) -> np.ndarray:
        return np.asarray(lengths, dtype=np.int64).copy()  # varlen attention: no padding

    def embed_tokenized(self, batch: TokenizedBatch, dims, groups=None, steps=None,
                        pooled: bool = False) -> dict[int, np.ndarray]:
        n = len(batch.lengths)
        out = {d: np.empty((n, d), dtype=np.float32) for d in dims}
        if pooled:
            out[POOLED] = np.empty((n, self.hidden_size), dtype=np.float32)
        offsets = batch.offsets
        for group in self.plan(batch.lengths) if groups is None else groups:
            ids = gather_sequences(batch.ids, offsets, group)
            packed = PackedBatch.from_lengths_and_ids(ids, batch.lengths[group])
            seconds = packed.num_tokens / self.rate
            time.sleep(seconds)  # the GPU's work: the GIL is released, no CPU is used
            self.math_s += seconds
            for key, vectors in unit_vectors(packed, out).items():
                out[key][group] = vectors
        return out


def unit_vectors(packed: PackedBatch, out: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per sequence and width, a one-hot unit vector at (sum of its ids) mod width:
    deterministic, a function of the text, and as cheap as copying the GPU's result back."""
    cu = packed.cu_seqlens_B1.numpy()
    sums = np.add.reduceat(packed.input_ids_T.numpy(), cu[:-1])
    result = {}
    for key, array in out.items():
        width = array.shape[1]
        vectors = np.zeros((len(sums), width), np.float32)
        vectors[np.arange(len(sums)), sums % width] = 1.0
        result[key] = vectors
    return result


def rate_spec(rate: float):
    """A job spec: the plain run's graph, its encode stage given a :class:`RateEncoder`."""
    from ..jobs.run import RUN  # lazy: ray (benchmarks import no Ray)

    return with_rate_encoder(RUN, rate)


def with_rate_encoder(spec, rate: float):
    """``spec`` (a ``JobSpec``: a plain run's, or a night's, see
    ``pipeline.jobs.nightly.run_nightly``'s ``adapt``) with its graph's encode stage given a
    :class:`RateEncoder`; everything else as the job builds it."""
    def graph(work):
        encode = work.plan.encode
        standin = dataclasses.replace(encode, kwargs=encode.kwargs | {
            "engine": functools.partial(RateEncoder, rate=rate)})
        return spec.graph(dataclasses.replace(
            work, plan=dataclasses.replace(work.plan, encode=standin)))

    # Its vectors are not the model's: an output made with it is never resumed, carried or
    # reused by a run of the real encoder (the fingerprint is an identity field compared).
    standin = {"model_fingerprint": f"stand-in encoder at {rate:g} tokens/s (benchmark only)"}
    return dataclasses.replace(spec, graph=graph, identity=dict(spec.identity) | standin)


# What a Ray worker's process title names while it works on a batch, for each stage.
# (An actor's title is "ray::MapWorker(MapBatches(TokenizeStage))", with ".submit" while it
# runs a batch and ".__init__" while it starts.)
STAGES = (("read", ("ReadShard",)), ("tokenize", ("TokenizeStage)).submit",)),
          ("encode", ("EncodeStage)).submit",)), ("write", ("write_batch",)))
WORK = tuple(stage for stage, _ in STAGES)
# Counted apart, never in the sum: an actor's constructor (model, tokenizer) runs once a run.
ONCE = "actor_start"


def stage_of(title: str, driver: bool = False) -> str:
    """What a process is doing, by its title (a Ray worker's names its actor or task, and the
    method running): a stage's work, an actor starting, the driver, other Ray workers (idle,
    Ray's own actors) or Ray's system processes (raylet, GCS, dashboard)."""
    if driver:
        return "driver"
    for stage, marks in STAGES:
        if any(mark in title for mark in marks):
            return stage
    if title.endswith(".__init__") or title.startswith("ray::MapWorker("):
        return ONCE
    return "ray_other" if title.startswith("ray::") else "ray_system"


class CpuSampler:
    """CPU seconds of this process and its descendants by :func:`stage_of`, split into those
    spent while the pipeline streams (some stage worked during the sampling interval) and
    those outside it (Ray's start, the pre-flight, the end of the run)."""

    def __init__(self, interval: float = 0.05, rescan: float = 1.0) -> None:
        # Short tasks (a write) must be seen under their own title: the known processes are
        # read every ``interval``, /proc scanned for new ones every ``rescan`` seconds.
        self.interval, self.rescan = interval, rescan
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, float] = {}
        self.streaming: dict[str, float] = {}
        self.outside: dict[str, float] = {}
        self._family: set[int] = set()
        self._scanned = 0.0
        self._own = 0.0  # the sampler thread's CPU seconds so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        self._own = time.thread_time()
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        me = os.getpid()
        if time.monotonic() - self._scanned > self.rescan:
            procs = _processes(self.ticks)
            self._family = {p for p in procs if p == me or _descends(p, me, procs)}
            self._scanned = time.monotonic()
        else:
            procs = _processes(self.ticks, self._family)
        delta: dict[str, float] = {"driver": 0.0}
        for pid in self._family & procs.keys():
            _, cpu, title = procs[pid]
            stage = stage_of(title, driver=pid == me)
            delta[stage] = delta.get(stage, 0.0) + cpu - self.seen.get(pid, 0.0)
            self.seen[pid] = cpu
        if threading.current_thread() is self._thread:  # the sampler's own cost is no stage's
            delta["driver"] -= time.thread_time() - self._own
            self._own = time.thread_time()
        into = self.streaming if any(delta.get(s, 0.0) > 0 for s in WORK) else self.outside
        for stage, seconds in delta.items():
            into[stage] = into.get(stage, 0.0) + seconds


def _processes(ticks: int, pids=None) -> dict[int, tuple[int, float, str]]:
    """``pid -> (parent pid, CPU seconds, title)`` of ``pids`` (default: every process)."""
    if pids is None:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(
                "utf-8", "replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[pid] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, title)
    return out


def _descends(pid: int, ancestor: int, procs: dict[int, tuple[int, float, str]]) -> bool:
    seen = set()
    while pid in procs and pid not in seen:
        seen.add(pid)
        pid = procs[pid][0]
        if pid == ancestor:
            return True
    return False
