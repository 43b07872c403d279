"""``python -m pipeline.bench encoder [--device cpu|cuda] [--dtypes float32,bfloat16]`` (no Ray).

Encoder alone, real-size random weights (768 wide, 12 layers, 8 experts, 250048 vocab), on a
synthetic passage mix (median ~110 tokens, tail to 512). Runs side by side, in one process:

* ``packed``: this project's path (length-sorted, token-budgeted packed batches, grouped MoE);
* ``baseline``: the straightforward usage of the hub code: sort by length, batches of 32
  padded to the longest, masked dense attention, a loop over experts that routes every
  position, pads included (:func:`pipeline.model.reference.padded_forward`).

Reports real tokens/s, padding waste, peak memory, and MFU on CUDA. Needs no Ray.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import time

import numpy as np
import torch

from ..batching import attention_padding, default_max_tokens, fixed_size_batches, padding_stats, plan_batches
from ..embedder import resolve_device, resolve_dtype
from ..model import EncoderConfig, PackedBatch, mean_pool
from ..model.cpu import retain_freed_memory
from ..model.builder import SIZES, random_encoder
from ..model.reference import padded_forward
from .workload import length_mix, machine, synthetic_ids

H100_BF16_FLOPS = 790e12  # measured dense bf16 matmul peak (MISSION.md)
BASELINE_BATCH = 32


def flops_per_sequence(cfg: EncoderConfig, n: int) -> float:
    """Matmul FLOPs of one sequence of ``n`` tokens (active experts only, no embedding)."""
    D, F, K, E = cfg.hidden_size, cfg.ffn_size, cfg.top_k, cfg.num_experts
    moe = len(cfg.moe_layers)
    dense = cfg.num_layers - moe
    per_token = cfg.num_layers * 8 * D * D + dense * 4 * D * F + moe * (K * 4 * D * F + 2 * D * E)
    attention = cfg.num_layers * 4 * n * D  # q.k and p.v per token, at length n
    return float(n * (per_token + attention))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated. CPU: peak resident set since the last reset (weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.inference_mode()
def run_packed(model, seqs, max_tokens: int, device) -> float:
    lengths = np.array([len(s) for s in seqs])
    for group in plan_batches(lengths, max_tokens):
        batch = PackedBatch.from_sequences([seqs[i] for i in group]).to(device)
        pooled = mean_pool(model.forward_packed(batch), batch)
    _sync(device)
    return float(pooled.sum())


@torch.inference_mode()
def run_baseline(model, seqs, device) -> float:
    lengths = np.array([len(s) for s in seqs])
    for group in fixed_size_batches(lengths, BASELINE_BATCH):
        L = int(lengths[group].max())
        ids = torch.full((len(group), L), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(group):
            ids[row, : lengths[i]] = torch.from_numpy(seqs[i])
            mask[row, : lengths[i]] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = padded_forward(model, ids, mask)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    _sync(device)
    return float(pooled.sum())


def measure(name, fn, seqs, cfg, device, repeats: int) -> dict:
    fn(seqs[:4])  # warm-up: kernels, allocator, thread pools
    _reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(seqs)
        times.append(time.perf_counter() - t0)
    best = min(times)
    tokens = int(sum(len(s) for s in seqs))
    result = {
        "path": name, "seconds": round(best, 3), "tokens": tokens,
        "tokens_per_s": round(tokens / best, 1), "peak_mem_gib": round(_peak_memory_gib(device), 2),
    }
    if device.type == "cuda":
        flops = sum(flops_per_sequence(cfg, len(s)) for s in seqs)
        result["mfu"] = round(flops / best / H100_BF16_FLOPS, 4)
    return result


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them CPU bf16 matmuls are emulated and very slow."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench_encoder(args) -> list[dict]:
    device = resolve_device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # as Embedder.from_pretrained does for CPU workers
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    lengths = length_mix(args.texts, args.seed)
    cfg = SIZES[args.size]
    seqs = synthetic_ids(lengths, cfg.vocab_size, args.seed)
    base_pad = padding_stats(lengths, fixed_size_batches(lengths, BASELINE_BATCH)).waste
    results = []
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name, device)
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
            print(f"skip {name}: this CPU has no AVX-512 BF16/AMX")
            continue
        model = random_encoder(cfg, seed=0, device=device, dtype=dtype)
        dtype_name = str(dtype).removeprefix("torch.")
        budget = args.max_tokens or default_max_tokens(device.type, dtype_name)
        # varlen attention on CUDA in half precision has no padding at all
        ours_pad = (0.0 if device.type == "cuda"
                    else attention_padding(lengths, plan_batches(lengths, budget)))
        common = {"dtype": dtype_name, "device": str(device), "max_tokens_per_batch": budget}
        packed = measure("packed", lambda s: run_packed(model, s, budget, device),
                         seqs, cfg, device, args.repeats)
        results.append(common | packed | {"matmul_padding": 0.0, "attention_padding":
                                          round(ours_pad, 4)})
        if not args.no_baseline:
            base = measure("baseline", lambda s: run_baseline(model, s, device), seqs,
                           cfg, device, args.repeats)
            results.append(common | base | {"max_tokens_per_batch": f"{BASELINE_BATCH} seqs",
                                            "matmul_padding": round(base_pad, 4),
                                            "attention_padding": round(base_pad, 4)})
        del model
    return results


def print_table(results: list[dict], header: dict) -> None:
    print(json.dumps(header))
    cols = ["device", "dtype", "path", "max_tokens_per_batch", "tokens", "seconds", "tokens_per_s", "matmul_padding",
            "attention_padding", "peak_mem_gib", "mfu"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    base = {r["dtype"]: r for r in results if r["path"] == "baseline"}
    fp32_base = base.get("float32")
    for r in results:
        if r["path"] == "packed":
            ref = base.get(r["dtype"])
            if ref:
                print(f"{r['dtype']}: packed / baseline = {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
            if fp32_base and r["dtype"] != "float32":
                print(f"{r['dtype']}: packed / float32 baseline = "
                      f"{r['tokens_per_s'] / fp32_base['tokens_per_s']:.2f}x")


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=sorted(SIZES), default="real",
                     help="model size with random weights (tiny: for a quick smoke run)")
    parser.add_argument("--dtypes", default=None, help="comma list; default float32,bfloat16 on "
                     "CPU, bfloat16 on CUDA")
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=None,
                     help="token budget per batch (default: pipeline.batching.default_max_tokens)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")


def main(args) -> None:
    if args.dtypes is None:
        args.dtypes = "bfloat16" if resolve_device(args.device).type == "cuda" else "float32,bfloat16"
    results = bench_encoder(args)
    header = {"benchmark": "encoder", "model": args.size, "date": datetime.date.today().isoformat(),
              "machine": machine(), "texts": args.texts,
              "median_len": float(np.median(length_mix(args.texts, args.seed)))}
    print_table(results, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)
