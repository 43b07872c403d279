"""``python -m pipeline.bench scale``: the job at lake scale, simulated on the local disk.

Writes ``--files`` small shards (Parquet or JSONL) holding ``--rows`` short rows in all, then
runs the real ``run`` and ``nightly`` jobs over them (the encoder is not what is measured: the
driver and the per-file cost are) with the tiny random-weight model's tokenizer and the GPU-rate
stand-in encoder (``--encoder-rate``, 1.5M tokens/s by default, ``pipeline/bench/rate.py``: it
sleeps ``tokens / rate`` and computes nothing, so encoding does not hide the rest; ``0``: the
tiny model encodes), on one local Ray started once:

- the run: its wall per input file (``per_file_ms``), the driver's peak RSS, its CPU per
  committed unit, the seconds from start until the graph can read (``first_row_s``: listing,
  pre-flight, planning, type settling, the output's manifests; then Ray schedules the
  reads) and until the first write record, the size of ``_summary.json`` and of
  ``_manifest/``;
- a baseline: the same rows in ``--baseline-files`` files (run twice, the first one
  warming Ray's worker processes up), whose wall is the run's fixed
  cost (Ray actors' start, the tokenizer's and model's loading, encoding or the stand-in's
  sleep): ``per_file_ms_marginal`` is what each
  further file costs, ``(wall - baseline wall) / (files - baseline files)``;
- a resume of that run killed at 50% (half the unit manifests removed, their part files left
  as strays, as a kill leaves them): the seconds to plan it (pre-flight, the manifests read,
  kept units, strays deleted; no Ray), then the resumed run, and whether every id is in the
  output exactly once;
- ``nightly``: the first night, an unchanged night (every unit carried from the previous
  snapshot), a night with 1% of the files changed in one run of consecutive files (a new
  partition, the common case in lakes: the units holding them go through the diff, the others
  are carried), and ``--spread-nights`` nights in a row with 1% of the files changed spread
  evenly (every 100th file, the next one each night: with units of ``files // 64`` small
  files, every unit holds a changed file and is touched: its changed files go through the
  diff, the others are copied, ``pipeline/stages/carry.py``). The first of them copies each
  unit as the first night's shuffle left it (a file's rows in several part files: decoded
  once, gathered), the next ones as a night in a lake's routine; each night's wall as a
  fraction of the first night's.

``driver_peak_rss_bytes`` is the benchmark process's peak (``ru_maxrss``): the driver, plus
what writing the shards took (small: one shard at a time). On Linux each job's own peak is
reported too (``driver_peak_rss_bytes`` in the run's and each night's entry): the peak is
reset before each job (``/proc/self/clear_refs``), so a growth is pinned on the job that
makes it; the top-level figure is then the largest of them and of the rest. Each job's entry
also has ``driver_peak_rss_kinds``: the peaks of the driver's RSS by kind, sampled every 50
ms from ``/proc/self/status`` (Linux): ``anon`` (the process's own memory: Python, Arrow,
Ray's core worker), ``file`` (mapped files: libraries) and ``shmem`` (pages of Ray's object
store that the driver mapped to read objects, e.g. write records: the node's shared memory,
counted in every process that touched them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import units
from ..config import RunConfig, parse_int_list, resolve_dtype_name
from ..io.storage import MANIFEST_DIR, SUMMARY_NAME
from ..io.writers import OutputSpec
from ..model.builder import build_model_dir
from .rate import rate_spec, with_rate_encoder
from .workload import emit, machine

WORDS = ("lake", "shard", "river", "stone", "paper", "glass", "north", "amber", "quiet",
         "metal", "cloud", "field", "light", "orbit", "delta", "cedar")


def row_text(i: int, night: int = 0) -> str:
    """A short row (about ten tokens); ``night`` > 0 gives the row a changed text."""
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6))
    return f"row {i} {words}" + (f" revised {night}" if night else "")


def write_shard(root: Path, k: int, ids: range, fmt: str, night: int = 0) -> None:
    texts = [row_text(i, night) for i in ids]
    if fmt == "parquet":
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": texts}),
                       root / f"shard-{k:06d}.parquet")
    else:
        lines = (json.dumps({"id": i, "text": t}) for i, t in zip(ids, texts))
        (root / f"shard-{k:06d}.jsonl").write_text("\n".join(lines) + "\n")


def shard_rows(files: int, rows: int) -> list[range]:
    """Each shard's ids: ``rows`` ids dealt over ``files`` shards, consecutive."""
    base, extra = divmod(rows, files)
    out, start = [], 0
    for k in range(files):
        n = base + (k < extra)
        out.append(range(start, start + n))
        start += n
    return out


def write_corpus(root: Path, files: int, rows: int, fmt: str) -> list[range]:
    root.mkdir(parents=True, exist_ok=True)
    shards = shard_rows(files, rows)
    for k, ids in enumerate(shards):
        write_shard(root, k, ids, fmt)
    return shards


def _usage() -> tuple[float, int]:
    """(the process's CPU seconds, its peak RSS in bytes: since the last :func:`_new_peak`
    where that could reset it)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss * 1024


PEAKS: list[int] = []  # the process's peaks before each reset


def _new_peak() -> bool:
    """Start measuring a new peak RSS (Linux: writing 5 to ``/proc/self/clear_refs`` resets
    it to the current RSS); the one so far is kept in :data:`PEAKS`. False where the peak
    cannot be reset (then every peak read is the process's)."""
    PEAKS.append(_usage()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_since(reset: bool) -> int | None:
    return _usage()[1] if reset else None


RSS_KINDS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def rss_kinds() -> dict[str, int]:
    """This process's resident bytes by kind (Linux ``/proc/self/status``; empty elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            lines = f.readlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in RSS_KINDS:
            out[RSS_KINDS[key]] = int(value.split()[0]) * 1024
    return out


class RssKindPeaks:
    """The peaks of :func:`rss_kinds` while the block runs, sampled every ``every`` seconds
    by a thread (``.peaks``; empty where the kinds cannot be read)."""

    def __init__(self, every: float = 0.05) -> None:
        self.every, self.peaks = every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for kind, n in rss_kinds().items():
                self.peaks[kind] = max(self.peaks.get(kind, 0), n)
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "RssKindPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for kind, n in rss_kinds().items():  # a last sample: the block's end
            self.peaks[kind] = max(self.peaks.get(kind, 0), n)


def dir_bytes(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    found = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(found), sum(p.stat().st_size for p in found)


def output_ids(out: Path) -> tuple[int, int]:
    """(rows, distinct ids) of an output's part files."""
    parts = sorted(out.glob("part-*.parquet"))
    if not parts:
        return 0, 0
    ids = pa.concat_arrays([pq.read_table(p, columns=["id"])["id"].combine_chunks()
                            for p in parts])
    return len(ids), len(pa.compute.unique(ids))


def measured_run(config: RunConfig, files: int, rate: float = 0) -> dict:
    from ..jobs.run import RUN, run  # lazy: ray (the other benchmarks run without it)

    reset = _new_peak()
    cpu0, _ = _usage()
    t0 = time.perf_counter()
    with RssKindPeaks() as kinds:
        summary = run(config, rate_spec(rate) if rate else RUN)
    wall = time.perf_counter() - t0
    cpu1, _ = _usage()
    out = Path(config.output)
    committed = summary["units"]["committed_now"]
    manifests = dir_bytes(out / MANIFEST_DIR)
    return {
        "wall_s": round(wall, 2), "per_file_ms": round(1000 * wall / files, 2),
        "rows_in": summary["rows_in"], "rows_embedded": summary["rows_embedded"],
        "reconciled": summary["reconciled"], "units": summary["units"],
        "driver_s": summary.get("driver_s"), "stage_busy_s": summary["stage_busy_s"],
        "tokens": summary["tokens"],
        "driver_cpu_s": round(cpu1 - cpu0, 2),
        "driver_cpu_ms_per_unit": round(1000 * (cpu1 - cpu0) / committed, 3) if committed else None,
        "driver_peak_rss_bytes": _peak_since(reset),
        "driver_peak_rss_kinds": kinds.peaks,
        "summary_bytes": (out / SUMMARY_NAME).stat().st_size,
        "manifest_files": manifests[0], "manifest_bytes": manifests[1],
        "part_files": len(list(out.glob("part-*.parquet"))),
    }


def kill_at_half(out: Path) -> int:
    """Leave ``out`` as a run killed at 50% leaves it: the later half of the unit manifests
    (by commit time) and the summary gone, their part files left as strays."""
    manifests = sorted((out / MANIFEST_DIR).glob("unit-*.json"),
                       key=lambda p: json.loads(p.read_text())["committed_at"])
    for p in manifests[len(manifests) // 2:]:
        p.unlink()
    (out / SUMMARY_NAME).unlink()
    return len(manifests) - len(manifests) // 2


def resume_plan_seconds(config: RunConfig, rate: float = 0) -> float:
    """Plan a resume as ``run`` does before and after Ray starts (pre-flight, the output's
    manifests, the kept units, strays deleted), without running it."""
    from ..jobs import run as job  # lazy: ray (see above)

    spec = rate_spec(rate) if rate else job.RUN
    t0 = time.perf_counter()
    setup = job.resume_state(config, spec)
    identity = units.run_identity(config, resolve_dtype_name(config.dtype, config.device),
                                  setup.model, setup.inputs) | dict(spec.identity)
    job.kept_units(config, setup, identity)
    return time.perf_counter() - t0


def nightly_night(config: RunConfig, rate: float = 0) -> dict:
    from ..jobs.nightly import run_nightly  # lazy: ray (see above)

    reset = _new_peak()
    t0 = time.perf_counter()
    with RssKindPeaks() as kinds:
        summary = run_nightly(config, functools.partial(with_rate_encoder, rate=rate)
                              if rate else None)
    wall = time.perf_counter() - t0
    peak = _peak_since(reset)
    keep = ("rows_in", "rows_new", "rows_changed", "rows_unchanged", "rows_reused",
            "rows_embedded", "reconciled")
    return {k: summary[k] for k in keep} | {"wall_s": round(wall, 2),
                                            "driver_s": summary.get("driver_s"),
                                            "driver_peak_rss_bytes": peak,
                                            "driver_peak_rss_kinds": kinds.peaks,
                                            "units": summary["units"]}


def bench_scale(args) -> dict:
    from ..cluster.session import ray_session  # lazy: ray (see above)

    model_dir = Path(args.model_dir or "models/bench-scale-tiny")
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, "tiny", seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=args.work_dir))
    rate = args.encoder_rate
    try:
        corpus, out = tmp / "corpus", tmp / "out"
        t0 = time.perf_counter()
        shards = write_corpus(corpus, args.files, args.rows, args.format)
        write_s = time.perf_counter() - t0
        config = RunConfig(input=str(corpus), output=str(out), model=str(model_dir),
                           dims=args.dims, device="cpu", progress="off", overwrite=True)
        if rate:  # the stand-in is a GPU: its write batches are a GPU run's (~128 MiB)
            config = dataclasses.replace(config, rows_per_file=OutputSpec(
                config.id_column, config.keep_columns, config.dims, config.output_dtype,
                {}).rows_per_file())
        result = {"benchmark": "scale", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime()),
                  "machine": machine(), "load_average": os.getloadavg(),
                  "files": args.files, "rows": args.rows, "format": args.format,
                  "encoder": f"stand-in at {args.encoder_rate:,} tokens/s (benchmark only)"
                  if args.encoder_rate else "the tiny random-weight model",
                  "corpus_write_s": round(write_s, 1)}
        with ray_session(config):  # one local Ray for every run (actors start afresh)
            if args.baseline_files:
                few = tmp / "baseline"
                write_corpus(few, args.baseline_files, args.rows, args.format)
                base = dataclasses.replace(config, input=str(few),
                                           output=str(tmp / "baseline-out"))
                # Twice: the first run in a Ray pays for its worker processes' start.
                result["warm_up_s"] = measured_run(base, args.baseline_files, rate)["wall_s"]
                result["baseline"] = measured_run(base, args.baseline_files, rate)
            first = measured_run(config, args.files, rate)
            result["run"] = first
            if args.resume:
                resume = dataclasses.replace(config, overwrite=False)
                result["killed_units"] = kill_at_half(out)
                result["resume_plan_s"] = round(resume_plan_seconds(resume, rate), 2)
                result["resumed_run"] = measured_run(resume, args.files, rate)
                rows, distinct = output_ids(out)
                result["resumed_ids_exact"] = rows == distinct == args.rows
            if args.nightly:
                nights = dataclasses.replace(config, output=str(tmp / "nightly"),
                                             overwrite=False)
                night = result["nightly"] = {"first": nightly_night(nights, rate),
                                             "unchanged": nightly_night(nights, rate)}
                count = max(1, round(args.files * args.changed_percent / 100))
                start = args.files // 2  # consecutive files, every row changed
                for k in range(start, min(args.files, start + count)):
                    write_shard(corpus, k, shards[k], args.format, night=3)
                night["changed_clustered"] = nightly_night(nights, rate)
                step = max(1, args.files // count)  # spread evenly
                for j in range(args.spread_nights):  # other files each night
                    changed = range(j % step, args.files, step)
                    for k in changed:
                        write_shard(corpus, k, shards[k], args.format, night=4 + j)
                    key = "changed_spread" if j == 0 else f"changed_spread_{j + 1}"
                    night[key] = nightly_night(nights, rate) | {"files_changed": len(changed)}
                for key, value in night.items():
                    if key != "first":
                        value["fraction_of_first_night"] = round(
                            value["wall_s"] / night["first"]["wall_s"], 4)
        rss = max([*PEAKS, _usage()[1]])
        unchanged = result.get("nightly", {}).get("unchanged")
        base = result.get("baseline")
        driver = first["driver_s"] or {}
        return result | {
            "driver_peak_rss_bytes": rss,
            "summary_bytes": first["summary_bytes"],
            "manifest_bytes": first["manifest_bytes"],
            "first_row_s": round(driver.get("preflight_s", 0) + driver.get("plan_s", 0), 3),
            "first_write_s": driver.get("first_write_s"),
            "resume_plan_s": result.get("resume_plan_s"),
            "per_file_ms": first["per_file_ms"],
            "per_file_ms_marginal": round(1000 * (first["wall_s"] - base["wall_s"])
                                          / (args.files - args.baseline_files), 2)
            if base and args.files > args.baseline_files else None,
            "unchanged_night_rows_per_s_per_core": round(
                unchanged["rows_in"] / unchanged["wall_s"] / (os.cpu_count() or 1), 1)
            if unchanged else None,
        }
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(parser) -> None:
    parser.add_argument("--files", type=int, default=100_000, help="input shards")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in all")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--model-dir", default=None,
                        help="a model folder (default models/bench-scale-tiny, built once)")
    parser.add_argument("--dims", default="64,32", help="output widths (the tiny model's)")
    parser.add_argument("--baseline-files", type=int, default=8,
                        help="first run the same rows in this many files (0: no baseline)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="skip the resume of a run killed at 50%%")
    parser.add_argument("--no-nightly", dest="nightly", action="store_false",
                        help="skip the nights")
    parser.add_argument("--changed-percent", type=float, default=1.0,
                        help="files changed before each night after the unchanged one")
    parser.add_argument("--spread-nights", type=int, default=3,
                        help="nights in a row with --changed-percent of the files changed "
                        "spread evenly, other files each night (the first of them copies "
                        "units as the first night's shuffle left them)")
    parser.add_argument("--work-dir", default=None, help="where the corpus and outputs go "
                                                         "(default: the system's temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    parser.add_argument("--encoder-rate", type=int, default=1_500_000,
                        help="tokens/s of the GPU-rate stand-in encoder (pipeline/bench/rate.py: "
                        "sleeps, computes nothing; benchmark only); 0: the tiny model encodes")
    parser.add_argument("--json", help="also write the result to this file")


def main(args) -> None:
    args.dims = parse_int_list(args.dims, "--dims") if isinstance(args.dims, str) else args.dims
    if args.files < 1 or args.rows < args.files:
        raise SystemExit("--files must be >= 1 and --rows >= --files")
    if args.spread_nights < 0:
        raise SystemExit("--spread-nights must be >= 0")
    if args.encoder_rate < 0:
        raise SystemExit("--encoder-rate must be 0 (the tiny model encodes) or positive tokens/s")
    emit(bench_scale(args), args.json)
