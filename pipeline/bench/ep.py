"""``python -m pipeline.bench ep``: expert parallelism vs. whole-model replicas, same processes.

One synthetic passage mix (``bench.workload.length_mix``, synthetic ids), token-budgeted batches
(``plan_batches``) dealt to ``P`` processes balanced by work (``deal_groups``), and three ways
to encode it, each in fresh processes (``torch.multiprocessing`` spawn; no Ray):

* ``single``: one process with every core (threads = cores), all batches: the reference;
* ``replicas``: ``P`` processes with ``cores // P`` threads, each with the whole model,
  each encoding its dealt batches; no communication;
* ``expert-parallel``: ``P`` ranks of one process group (gloo on CPU, NCCL on CUDA), each
  loading the dense weights and ``E/P`` experts of every MoE layer
  (``load_encoder(placement=...)``), each encoding its dealt batches in lockstep (``steps`` =
  the most batches any rank has; a rank out of batches serves the others' tokens idle).

Each mode loads its model from ``models/bench-<size>`` (random weights in the hub layout, built
once; ``load_s`` is short on CPU, where the weights are memory-mapped and paged in by the
warm-up), warms up on its first dealt batch, then times the encode phase only: ``replicas`` from
a common barrier to the last process done, ``expert-parallel`` between two process-group
barriers. Reported per mode: tokens/s, parameters and weight bytes per process, peak RSS per
process and, at the end, its anonymous and file-backed parts (on CPU the safetensors weights
stay memory-mapped: processes loading the same file share those pages), peak CUDA memory. The
bench checks itself: the EP (and replica) embeddings must equal the single-process ones
(fp32: max |diff| < 1e-5; exit status 1 otherwise).

What explains when EP pays, computed from the single run's router decisions (each MoE layer's
top-k experts per token, the same on every path) and the deal of batches to ranks:

* the fraction of routed slots whose expert lives on another rank, and from it the
  all-to-all bytes per token (out and back: ``2 * top_k * remote fraction * D * element size``
  per MoE layer);
* routed slots per expert per MoE-layer call: a replica's expert sees one batch's slots, an
  EP rank's expert those of all ``P`` ranks' batches of that step (bigger expert matmuls);
* the rank imbalance at the exchanges (the most loaded rank's slots / the mean), and the time
  each rank spends blocked in ``all_to_all_single`` (communication plus waiting for the
  slower rank), measured by wrapping ``torch.distributed.all_to_all_single`` in the rank
  processes (wall clock on CPU, CUDA events on the current stream on CUDA); a rank's own
  work is its time minus that, and their mean bounds what EP could reach with no waiting.

The random-weight models route most tokens of a MoE layer to two or three experts (4 of the
real size's 6 MoE layers send > 99% of their slots to one rank's half of the experts), so one
rank does all the expert work: EP's worst case. ``--balanced-routers`` replaces the routers
by calibrated ones that spread the tokens as a trained router does (see
:func:`balanced_routers`), in every mode alike.

Measured on the 2-core dev machine (real size, fp32, 128 passages, 18817 tokens, P = 2):
routers as built: single 766, replicas 828, EP 567 tokens/s (EP / replicas 0.69x; rank 0
blocked 45% of the wall waiting for rank 1's experts); balanced routers: single 792, replicas
819, EP 756 tokens/s (0.92x; each rank blocked 8-9% of the wall, its own work the same as a
replica's). All-to-all 36-37 KB per token (6 KB per MoE layer), ~50% of slots remote.

torch is imported inside functions: each spawned worker sets its thread count before it imports
torch, and the parent imports it only once the workers are planned.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..batching import deal_groups, default_max_tokens, plan_batches
from ..model.config import check_split, load_config
from ..tokenize import TokenizedBatch
from .workload import length_mix, machine, synthetic_ids

MODES = ("single", "replicas", "expert-parallel")
FP32_TOLERANCE = 1e-5
TIMEOUT_S = 600.0  # one collective / the rendezvous, before a rank gives up


# -- in the spawned processes ----------------------------------------------------------------


def _rss_gib() -> dict:
    """This process's resident set in GiB: peak (``getrusage``), and now: all, anonymous
    (activations, heap) and file-backed (weights: safetensors are memory-mapped, so processes
    loading the same file share those pages)."""
    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    try:
        for line in open("/proc/self/status"):
            key = {"VmRSS:": "now", "RssAnon:": "anon", "RssFile:": "file"}.get(line.split()[0])
            if key:
                out[key] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {k: round(v, 3) for k, v in out.items()}


class _CollectiveTimer:
    """Wraps ``torch.distributed.all_to_all_single`` (looked up at call time by
    ``pipeline.model.expert_parallel``) to sum the time spent in it, per exchange kind."""

    def __init__(self, cuda: bool) -> None:
        import torch.distributed as dist  # lazy: torch, see the module docstring

        self.dist, self.cuda = dist, cuda
        self.original = dist.all_to_all_single
        self.records: list = []  # (call index, seconds or (start event, end event))

    def __enter__(self) -> "_CollectiveTimer":
        import torch

        original, records = self.original, self.records

        def timed(*args, **kwargs):
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                result = original(*args, **kwargs)
                end.record()
                records.append((start, end))
            else:
                t0 = time.perf_counter()
                result = original(*args, **kwargs)
                records.append(time.perf_counter() - t0)
            return result

        self.dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc) -> None:
        self.dist.all_to_all_single = self.original

    def seconds(self) -> dict:
        """Blocked seconds: ``counts`` (1st exchange of a MoE layer: it also absorbs waiting
        for the other ranks' attention and dense layers), ``tokens`` (out and back)."""
        secs = [r if not self.cuda else r[0].elapsed_time(r[1]) / 1e3 for r in self.records]
        counts = sum(s for i, s in enumerate(secs) if i % 3 == 0)
        return {"calls": len(secs), "counts_s": round(counts, 3),
                "tokens_s": round(sum(secs) - counts, 3), "total_s": round(sum(secs), 3)}


def _worker(rank: int, spec: dict, out_dir: str) -> None:
    import torch  # lazy: torch, see the module docstring

    torch.set_num_threads(spec["threads"])
    # Lazy: these import torch, after this worker process set its thread count.
    from ..embedder import Embedder
    from ..model.expert_parallel import init_group

    mode, world = spec["mode"], spec["processes"]
    cuda = spec["device"] == "cuda"
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    placement = None
    if mode == "expert-parallel":
        placement = init_group(rank, world, spec["init_method"], device, TIMEOUT_S)
    emb = Embedder.from_pretrained(spec["model_dir"], device=device, dtype=spec["dtype"],
                                   max_tokens_per_batch=spec["max_tokens"], placement=placement)
    enc = emb.encoder
    if spec.get("routers"):  # --balanced-routers: the same calibrated routers in every mode
        routers = torch.load(spec["routers"], weights_only=True)
        for i, block in enumerate(enc.layers):
            if i in routers:
                block.ffn.router_ED = torch.nn.Parameter(routers[i].to(device), requires_grad=False)
    load_s = time.perf_counter() - t0

    # This process's batches, as positions in its own sub-batch of the mix.
    lengths, ids, groups = spec["lengths"], spec["ids"], spec["groups"]
    members = [groups[i] for i in spec["dealt"][rank]]
    seqs = np.concatenate(members) if members else np.zeros(0, np.int64)
    flat = np.concatenate([ids[i] for i in seqs]) if len(seqs) else np.zeros(0, np.int64)
    batch = TokenizedBatch(flat, lengths[seqs], np.zeros(len(seqs), bool))
    starts = np.cumsum([0] + [len(g) for g in members])
    local = [np.arange(starts[j], starts[j + 1]) for j in range(len(members))]
    steps = spec["steps"] if placement else None
    dims = (enc.config.hidden_size,)

    # Warm-up (kernels, thread pools, the heap): this process's first (heaviest) batch.
    emb.embed_tokenized(batch, dims, local[:1], steps=1 if placement else None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    sinks: list[list] = []
    hooks = []
    if spec["collect_routing"]:  # each MoE layer's Routing, per batch (see forward_packed)
        for block in enc.layers:
            if hasattr(block.ffn, "router_ED"):
                sink: list = []
                sinks.append(sink)
                hooks.append(block.ffn.register_forward_pre_hook(
                    lambda module, args, sink=sink: (args[0], sink)))

    timer = _CollectiveTimer(cuda) if placement else None
    if placement:
        torch.distributed.barrier()
    elif spec.get("barrier") is not None:
        spec["barrier"].wait()
    start = time.perf_counter()
    if timer:
        with timer:
            out = emb.embed_tokenized(batch, dims, local, steps=steps)
    else:
        out = emb.embed_tokenized(batch, dims, local, steps=steps)
    sync()
    done = time.perf_counter()
    if placement:
        torch.distributed.barrier()
    end = time.perf_counter()
    for hook in hooks:
        hook.remove()

    params = list(enc.parameters())
    result = {
        "rank": rank, "pid": os.getpid(), "threads": torch.get_num_threads(),
        "batches": len(local), "tokens": int(batch.lengths.sum()),
        "load_s": round(load_s, 2), "start": start, "done": done, "end": end,
        "busy_s": round(done - start, 3),
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_gib": _rss_gib(),
        "act_element_bytes": torch.empty(0, dtype=enc.dtype).element_size(),
    }
    if cuda:
        result["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if timer:
        result["all_to_all"] = timer.seconds()
    np.save(Path(out_dir) / f"emb-{rank}.npy", out[dims[0]])
    np.save(Path(out_dir) / f"seqs-{rank}.npy", seqs)
    if sinks:
        E = enc.config.num_experts
        counts = np.array([[np.bincount(r.topk_ids_TK.reshape(-1).cpu().numpy(), minlength=E)
                            for r in sink] for sink in sinks])  # [MoE layer, batch, E]
        np.save(Path(out_dir) / f"routing-{rank}.npy", counts.transpose(1, 0, 2))
    (Path(out_dir) / f"result-{rank}.json").write_text(json.dumps(result))
    if placement:
        torch.distributed.destroy_process_group()


# -- the parent --------------------------------------------------------------------------------


def run_mode(mode: str, processes: int, threads: int, common: dict, tmp: Path) -> dict:
    """Spawn ``processes`` workers for one mode; their results, embeddings in input order."""
    import torch.multiprocessing as mp  # lazy: torch, see the module docstring

    out_dir = tmp / mode
    out_dir.mkdir()
    spec = common | {"mode": mode, "processes": processes, "threads": threads,
                     "collect_routing": mode == "single",
                     "init_method": f"file://{tmp / (mode + '.rendezvous')}"}
    if mode == "single":
        spec["dealt"] = [list(range(len(common["groups"])))]
    if mode == "replicas":
        spec["barrier"] = mp.get_context("spawn").Barrier(processes)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts in the children
    try:
        mp.spawn(_worker, args=(spec, str(out_dir)), nprocs=processes, join=True)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    ranks = [json.loads((out_dir / f"result-{r}.json").read_text()) for r in range(processes)]
    n = len(common["lengths"])
    emb = None
    for r in range(processes):
        vectors, seqs = np.load(out_dir / f"emb-{r}.npy"), np.load(out_dir / f"seqs-{r}.npy")
        if emb is None:
            emb = np.full((n, vectors.shape[1]), np.nan, np.float32)
        emb[seqs] = vectors
    routing = out_dir / "routing-0.npy"
    wall = max(r["done"] for r in ranks) - min(r["start"] for r in ranks)
    if mode == "expert-parallel":
        wall = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    row = {
        "mode": mode, "processes": processes, "threads": ranks[0]["threads"], "tokens": tokens,
        "load_s": max(r["load_s"] for r in ranks), "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "params_per_proc": ranks[0]["parameters"],
        "weights_gib_per_proc": round(ranks[0]["weight_bytes"] / 2**30, 3),
        "peak_rss_gib": max(r["rss_gib"]["peak"] for r in ranks),
        "rss_end_anon_file_gib": [(r["rss_gib"].get("anon"), r["rss_gib"].get("file"))
                                  for r in ranks],
        "busy_s": [r["busy_s"] for r in ranks],
    }
    if "cuda_peak_gib" in ranks[0]:
        row["cuda_peak_gib"] = max(r["cuda_peak_gib"] for r in ranks)
    if "all_to_all" in ranks[0]:
        row["all_to_all"] = [r["all_to_all"] for r in ranks]
        # Each rank's own work (busy minus blocked in exchanges); their mean is what EP would
        # take with no waiting for another rank (perfect balance, free communication).
        work = [r["busy_s"] - r["all_to_all"]["total_s"] for r in ranks]
        row["compute_s"] = [round(w, 3) for w in work]
        row["balanced_bound_tokens_per_s"] = round(tokens / (sum(work) / len(work)), 1)
    return {"row": row, "ranks": ranks, "embeddings": emb,
            "routing": np.load(routing) if routing.is_file() else None,
            "element_bytes": ranks[0]["act_element_bytes"]}


def ep_quantities(cfg, counts: np.ndarray, dealt: list[list[int]], processes: int,
                  element_bytes: int, ep_row: dict | None) -> dict:
    """What explains EP's cost and gain, from routed-slot counts ``[batch, MoE layer, E]``."""
    E, K, D = cfg.num_experts, cfg.top_k, cfg.hidden_size
    layers = counts.shape[1]
    per_rank = E // processes
    owner = np.arange(E) // per_rank
    slots = int(counts.sum())
    remote = 0
    for r, mine in enumerate(dealt):
        for b in mine:
            remote += int(counts[b][:, owner != r].sum())
    frac = remote / slots if slots else 0.0
    tokens = slots // (K * layers)
    per_layer = 2 * K * frac * D * element_bytes  # out and back
    steps = max(len(d) for d in dealt)
    # Per step and MoE layer: slots each expert receives from all ranks; each rank's load.
    per_expert, imbalance = [], []
    for s in range(steps):
        step = sum(counts[d[s]] for d in dealt if s < len(d))  # [layer, E]
        per_expert.append(step)
        rank_load = step.reshape(layers, processes, per_rank).sum(-1)  # [layer, rank]
        mean = rank_load.mean(1)
        imbalance += list(rank_load.max(1)[mean > 0] / mean[mean > 0])
    by_layer = counts.sum(0)  # [layer, E]
    expert_imbalance = by_layer.max(1) / by_layer.mean(1)
    owned = counts.sum(0).reshape(layers, processes, per_rank).sum(-1)  # [layer, rank]
    share = owned / owned.sum(1, keepdims=True)
    out = {
        "moe_layers": layers, "experts": E, "top_k": K, "hidden": D,
        "element_bytes": element_bytes,
        "remote_slot_fraction": round(frac, 4),
        "remote_slot_fraction_uniform": round((processes - 1) / processes, 4),
        "a2a_bytes_per_token_per_moe_layer": round(per_layer, 1),
        "a2a_bytes_per_token": round(per_layer * layers, 1),
        "a2a_bytes_total": int(remote * D * element_bytes * 2),
        "counts_bytes_per_step": int(layers * processes * E * 8),
        "slots_per_expert_per_call_replica": round(float(counts.mean()), 1),
        "slots_per_expert_per_call_ep": round(float(np.mean(per_expert)), 1),
        "ep_rank_imbalance_mean": round(float(np.mean(imbalance)), 3) if imbalance else None,
        "expert_imbalance_by_layer": expert_imbalance.round(2).tolist(),
        "rank_slot_share_by_layer": share.round(3).tolist(),
        "steps": steps, "batches": sum(len(d) for d in dealt),
        "idle_steps": steps * processes - sum(len(d) for d in dealt),
        "tokens_routed": tokens,
    }
    if ep_row:
        out["a2a_gbit_per_s_needed"] = round(
            out["a2a_bytes_total"] / processes * 8 / ep_row["seconds"] / 1e9, 3)
    return out


def balanced_routers(model_dir: Path, passages: int, seed: int, out: Path) -> dict:
    """Routers that spread this mix over the experts, written to ``out`` (``{layer: [E, D]}``).

    The random-weight models route most tokens of a MoE layer to two or three experts: the
    hidden states share one dominant direction, and a random router ranks the experts by it
    for every token alike (a trained router is trained against that, with a load-balancing
    loss). Each MoE layer's router here gets that direction (the mean of its inputs over a
    calibration mix, taken with the earlier layers' routers already changed) projected out,
    so the experts are chosen by what differs between tokens.
    """
    import torch  # lazy: torch, see the module docstring

    from ..model import PackedBatch, load_encoder  # lazy: torch (see the module docstring)

    enc = load_encoder(model_dir)
    routers: dict[int, torch.Tensor] = {}

    def project(index):
        def hook(module, args):
            u = args[0].float().mean(0)
            u = u / u.norm()
            w = module.router_ED.detach().float()
            routers[index] = w - (w @ u)[:, None] * u[None, :]
            module.router_ED = torch.nn.Parameter(routers[index], requires_grad=False)
        return hook

    hooks = [block.ffn.register_forward_pre_hook(project(i))
             for i, block in enumerate(enc.layers) if hasattr(block.ffn, "router_ED")]
    lengths = length_mix(passages, seed)
    with torch.inference_mode():
        enc.forward_packed(PackedBatch.from_sequences(
            synthetic_ids(lengths, enc.config.vocab_size, seed)))
    for hook in hooks:
        hook.remove()
    torch.save(routers, out)
    return {"calibration_passages": passages, "calibration_seed": seed}


def bench_ep(args) -> tuple[dict, list[dict], bool]:
    import torch  # lazy: torch, see the module docstring

    # Lazy: torch, imported by the parent only once its workers are planned.
    from ..embedder import resolve_dtype
    from ..model.builder import build_model_dir

    t_all = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    P = args.processes
    cores = len(os.sched_getaffinity(0))
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if not gpus:
            sys.exit("--device cuda: torch sees no CUDA device")
        if gpus < P and ("replicas" in modes or "expert-parallel" in modes):
            sys.exit(f"--device cuda --processes {P} needs {P} GPUs (one per process; NCCL "
                     f"cannot put two ranks on one GPU), this machine has {gpus}: use "
                     f"--processes {gpus} or fewer")
    elif args.device != "cpu":
        sys.exit(f"--device must be cpu or cuda, not {args.device!r}")
    model_dir = Path(args.model_dir or f"models/bench-{args.size}")
    if not (model_dir / "config.json").is_file():
        print(f"building {args.size} random-weight model in {model_dir} ...", flush=True)
        build_model_dir(model_dir, args.size, seed=0)
    cfg = load_config(model_dir)
    try:
        check_split(cfg.num_experts, P)
    except ValueError as err:
        sys.exit(str(err))
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    dtype_name = str(dtype).removeprefix("torch.")
    budget = args.max_tokens or default_max_tokens(args.device, dtype_name)
    lengths = length_mix(args.passages, args.seed)
    ids = synthetic_ids(lengths, cfg.vocab_size, args.seed)
    groups = plan_batches(lengths, budget)
    dealt = deal_groups(lengths, groups, P)
    steps = max(len(d) for d in dealt)
    common = {"model_dir": str(model_dir), "device": args.device, "dtype": dtype_name,
              "max_tokens": budget, "lengths": lengths, "ids": ids, "groups": groups,
              "dealt": dealt, "steps": steps}
    threads = max(1, cores // P)
    runs: dict[str, dict] = {}
    routers = {"routers": "as built"}
    with tempfile.TemporaryDirectory(prefix="bench-ep-") as tmp:
        if args.balanced_routers:
            print("calibrating balanced routers ...", flush=True)
            common["routers"] = str(Path(tmp) / "routers.pt")
            routers = {"routers": "balanced"} | balanced_routers(
                model_dir, 16, args.seed + 1000, Path(common["routers"]))
        for mode in modes:
            print(f"running {mode} ...", flush=True)
            procs, thr = (1, args.single_threads or cores) if mode == "single" else (P, threads)
            runs[mode] = run_mode(mode, procs, thr, common, Path(tmp))
    rows = [runs[m]["row"] for m in modes]
    ok = True
    if "single" in runs:
        ref = runs["single"]["embeddings"]
        base = runs["single"]["row"]["tokens_per_s"]
        for row in rows:
            row["vs_single"] = round(row["tokens_per_s"] / base, 3)
            if row["mode"] != "single":
                diff = float(np.abs(runs[row["mode"]]["embeddings"] - ref).max())
                row["max_abs_diff_vs_single"] = diff
                if dtype == torch.float32 and not diff < FP32_TOLERANCE:
                    ok = False
    header = {
        "benchmark": "ep", "model": args.size, "date": datetime.date.today().isoformat(),
        "machine": machine(), "device": args.device, "dtype": dtype_name,
        "processes": P, "threads_per_process": threads, "passages": args.passages,
        "tokens": int(lengths.sum()), "median_len": float(np.median(lengths)),
        "max_tokens_per_batch": budget, "batches": len(groups),
        "batches_per_process": [len(d) for d in dealt],
    } | routers
    if "single" in runs:
        header["ep"] = ep_quantities(
            cfg, runs["single"]["routing"], dealt, P, runs["single"]["element_bytes"],
            runs.get("expert-parallel", {}).get("row"))
    header["bench_wall_s"] = round(time.perf_counter() - t_all, 1)
    return header, rows, ok


def print_report(header: dict, rows: list[dict]) -> None:
    cols = ["mode", "processes", "threads", "tokens", "load_s", "seconds", "tokens_per_s",
            "vs_single", "params_per_proc", "weights_gib_per_proc", "peak_rss_gib",
            "cuda_peak_gib", "max_abs_diff_vs_single"]
    head = {k: v for k, v in header.items() if k != "ep"}
    print(json.dumps(head))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2e}" if c == "max_abs_diff_vs_single" and v != "" else str(v))
        print("| " + " | ".join(cells) + " |")
    by = {r["mode"]: r for r in rows}
    for r in rows:
        print(f"{r['mode']}: busy seconds per process {r['busy_s']}; resident GiB at the end "
              f"(anonymous, file-backed) per process {r['rss_end_anon_file_gib']}")
        for rank, a2a in enumerate(r.get("all_to_all", [])):
            print(f"  rank {rank}: blocked in all_to_all_single {a2a['total_s']} s "
                  f"({a2a['total_s'] / r['seconds']:.0%} of the wall; counts {a2a['counts_s']} s, "
                  f"tokens out+back {a2a['tokens_s']} s; {a2a['calls']} calls); own work "
                  f"{r['compute_s'][rank]} s")
        if "balanced_bound_tokens_per_s" in r:
            print(f"  with the ranks' work evenly spread and no waiting: at most "
                  f"{r['balanced_bound_tokens_per_s']} tokens/s")
    if "expert-parallel" in by and "replicas" in by:
        ratio = by["expert-parallel"]["tokens_per_s"] / by["replicas"]["tokens_per_s"]
        print(f"expert-parallel / replicas = {ratio:.2f}x tokens/s "
              f"({'EP' if ratio > 1 else 'replicas'} faster here)")
    ep = header.get("ep")
    if ep:
        print(f"EP routing ({ep['moe_layers']} MoE layers, {ep['experts']} experts, top-"
              f"{ep['top_k']}, D={ep['hidden']}, {ep['element_bytes']} B/element): "
              f"{ep['remote_slot_fraction']:.1%} of routed slots go to another rank "
              f"(uniform routing: {ep['remote_slot_fraction_uniform']:.0%})")
        print(f"  all-to-all per token: {ep['a2a_bytes_per_token_per_moe_layer']:.0f} B per MoE "
              f"layer, {ep['a2a_bytes_per_token']:.0f} B in all (out and back); "
              f"{ep['a2a_bytes_total'] / 2**20:.1f} MiB for the mix"
              + (f", {ep['a2a_gbit_per_s_needed']} Gbit/s per rank at the measured EP rate"
                 if "a2a_gbit_per_s_needed" in ep else ""))
        print(f"  routed slots per expert per MoE call: {ep['slots_per_expert_per_call_replica']}"
              f" (one batch, replica) vs {ep['slots_per_expert_per_call_ep']} (EP step, all "
              f"ranks' batches); {ep['steps']} steps, {ep['idle_steps']} idle rank-steps")
        print(f"  load: busiest rank / mean, per step and MoE layer {ep['ep_rank_imbalance_mean']};"
              f" busiest expert / mean per MoE layer {ep['expert_imbalance_by_layer']}")
        print("  share of the routed slots each rank's experts serve, per MoE layer: "
              + ", ".join(str(s) for s in ep["rank_slot_share_by_layer"]))


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="auto", help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--processes", type=int, default=2,
                        help="processes P of replicas and ranks of expert-parallel (default 2)")
    parser.add_argument("--passages", type=int, default=128)
    parser.add_argument("--size", choices=("tiny", "real"), default="real",
                        help="random-weight model size (tiny: a quick smoke run)")
    parser.add_argument("--model-dir", default=None, help="default models/bench-<size>")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="token budget per batch (default: pipeline.batching.default_max_tokens)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma list of single, replicas, expert-parallel (default all)")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="threads of the single process (default: every core)")
    parser.add_argument("--balanced-routers", action="store_true",
                        help="replace the random model's routers (most tokens to 2-3 experts) by "
                        "calibrated ones that spread tokens over the experts, as trained ones do")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")


def main(args) -> None:
    if args.processes < 1:
        sys.exit("--processes must be >= 1")
    header, rows, ok = bench_ep(args)
    print_report(header, rows)
    result = {"header": header, "results": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not ok:
        sys.exit(f"FAILED: an embedding differs from the single-process one by more than "
                 f"{FP32_TOLERANCE} (float32)")
