"""``python -m pipeline.bench encoder [--device cpu|cuda] [--dtypes float32,bfloat16]`` (no Ray).

Encoder alone, real-size random weights (768 wide, 12 layers, 8 experts, 250048 vocab), on a
synthetic passage mix (median ~110 tokens, tail to 512). Runs side by side, in one process:

* ``packed``: this project's path (length-sorted, token-budgeted packed batches, grouped MoE);
* ``baseline``: the straightforward usage of the hub code: sort by length, batches of 32
  padded to the longest, masked dense attention, a loop over experts that routes every
  position, pads included (:func:`pipeline.model.reference.padded_forward`).

Each dtype's matmul roofline is measured on the spot (``F.linear`` at the model's own shapes,
:func:`matmul_roofline`) and each path's tokens/s given as a fraction of it, so the number means
something on any machine. The timed texts are ones whose batch shapes the process has not
seen (the warm-up runs another mix), as a pipeline's encoder meets them; ``--repeats 2`` and
more also time the same texts again (shapes seen). A half-precision dtype's pooled vectors are
compared with float32's, text by text (cosine), when float32 runs too.

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
import torch.nn.functional as F

from ..batching import attention_padding, default_max_tokens, fixed_size_batches, padding_stats, plan_batches
from ..embedder import resolve_device, resolve_dtype
from ..model import EncoderConfig, PackedBatch, mean_pool
from ..model.cpu import cpu_features, has_bf16_matmul, retain_freed_memory
from ..model.builder import SIZES, random_encoder
from ..model.reference import padded_forward
from .workload import length_mix, machine, synthetic_ids, warm_up_ids

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


def matmul_shapes(cfg: EncoderConfig) -> list[tuple[int, int, int]]:
    """The dense matmuls one token goes through: ``(in, out, times)`` (qkv and out projections
    in every layer; fc1 and fc2 in dense layers and top-k experts' in MoE layers)."""
    D, F_, K = cfg.hidden_size, cfg.ffn_size, cfg.top_k
    moe = len(cfg.moe_layers)
    ffn = cfg.num_layers - moe + moe * K
    return [(D, 3 * D, cfg.num_layers), (D, D, cfg.num_layers), (D, F_, ffn), (F_, D, ffn)]


@torch.inference_mode()
def matmul_roofline(cfg: EncoderConfig, dtype: torch.dtype, device: torch.device,
                    rows: int = 4096, repeats: int = 5) -> dict:
    """This machine's matmul speed in ``dtype`` at the model's shapes, timed now: ``F.linear``
    over ``rows`` tokens for each shape of :func:`matmul_shapes`, best of ``repeats``. The
    ``roofline_tokens_per_s`` is what the encoder would reach if its matmuls were all it did."""
    seconds_per_token = flops_per_token = 0.0
    for n_in, n_out, times in matmul_shapes(cfg):
        x = torch.randn(rows, n_in, device=device).to(dtype)
        w = torch.randn(n_out, n_in, device=device).to(dtype) * n_in ** -0.5
        b = torch.zeros(n_out, device=device, dtype=dtype)
        seconds_per_token += times * _best_seconds(lambda: F.linear(x, w, b), device,
                                                   repeats) / rows
        flops_per_token += times * 2.0 * n_in * n_out
    return {"matmul_tflops": round(flops_per_token / seconds_per_token / 1e12, 3),
            "roofline_tokens_per_s": round(1.0 / seconds_per_token, 1)}


@torch.inference_mode()
def int8_matmul_ceiling(cfg: EncoderConfig, device: torch.device, rows: int = 4096,
                        repeats: int = 5) -> dict:
    """This machine's int8 matmul speed at the model's shapes against bf16's, timed back to
    back shape by shape (best of ``repeats`` each): ``torch._int_mm`` (int8 inputs, int32 out)
    with no quantizing, scaling or casting back counted, and ``F.linear`` in bf16 as
    :func:`matmul_roofline` times it. So the most an int8 encoder could gain over the bf16 one's
    matmuls (AVX-512 VNNI or AMX int8 on CPUs). ``error`` where this torch has no int8 (or
    bf16) matmul on ``device``."""
    seconds = {"int8": 0.0, "bfloat16": 0.0}
    flops_per_token = 0.0

    def best(fn) -> float:
        return _best_seconds(fn, device, repeats)

    try:
        for n_in, n_out, times in matmul_shapes(cfg):
            xi = torch.randint(-127, 128, (rows, n_in), dtype=torch.int8, device=device)
            wi = torch.randint(-127, 128, (n_in, n_out), dtype=torch.int8, device=device)
            xb = torch.randn(rows, n_in, device=device).to(torch.bfloat16)
            wb = (torch.randn(n_out, n_in, device=device) * n_in ** -0.5).to(torch.bfloat16)
            bb = torch.zeros(n_out, device=device, dtype=torch.bfloat16)
            seconds["bfloat16"] += times * best(lambda: F.linear(xb, wb, bb)) / rows
            seconds["int8"] += times * best(lambda: torch._int_mm(xi, wi)) / rows
            flops_per_token += times * 2.0 * n_in * n_out
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    # Four significant digits: a tiny model's rates are thousandths of a TFLOP/s.
    return {"int8_matmul_tops": float(f"{flops_per_token / seconds['int8'] / 1e12:.4g}"),
            "bfloat16_matmul_tflops": float(f"{flops_per_token / seconds['bfloat16'] / 1e12:.4g}"),
            "vs_bfloat16_matmuls": round(seconds["bfloat16"] / seconds["int8"], 2),
            "int8_roofline_tokens_per_s": round(1.0 / seconds["int8"], 1)}


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The best of ``repeats`` timed calls of ``fn`` after two untimed ones."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


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
def run_packed(model, seqs, max_tokens: int, device) -> torch.Tensor:
    """The pooled vectors ``[N, D]`` (float32, on ``device``) of ``seqs``, in their order."""
    lengths = np.array([len(s) for s in seqs])
    out = torch.empty(len(seqs), model.config.hidden_size, device=device)
    for group in plan_batches(lengths, max_tokens):
        batch = PackedBatch.from_sequences([seqs[i] for i in group]).to(device)
        out[torch.as_tensor(group).to(device, non_blocking=True)] = mean_pool(
            model.forward_packed(batch), batch)
    return out


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


def measure(name, fn, seqs, warm_seqs, cfg, device, repeats: int) -> tuple[dict, object]:
    """Time ``fn`` on ``seqs`` after a warm-up on ``warm_seqs`` (kernels, allocator, thread
    pools; other batch shapes than the timed ones). The first timed run meets shapes the
    process has not seen (``tokens_per_s``); later repeats see them again
    (``tokens_per_s_seen``, best of them). Returns the result and ``fn``'s output."""
    fn(warm_seqs)
    _reset_peak_memory(device)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        output = fn(seqs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    tokens = int(sum(len(s) for s in seqs))
    result = {
        "path": name, "seconds": round(times[0], 3), "tokens": tokens,
        "tokens_per_s": round(tokens / times[0], 1),
        "peak_mem_gib": round(_peak_memory_gib(device), 2),
    }
    if len(times) > 1:
        result["tokens_per_s_seen"] = round(tokens / min(times[1:]), 1)
    if device.type == "cuda":
        flops = sum(flops_per_sequence(cfg, len(s)) for s in seqs)
        result["mfu"] = round(flops / times[0] / H100_BF16_FLOPS, 4)
    return result, output


def min_cosine(a_ND: torch.Tensor, b_ND: torch.Tensor) -> float:
    """The lowest cosine between the rows of ``a`` and ``b`` (text by text)."""
    return float(F.cosine_similarity(a_ND.double().cpu(), b_ND.double().cpu(), dim=-1).min())


def bench_encoder(args) -> list[dict]:
    device = resolve_device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # as Embedder.from_pretrained does for CPU workers
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    lengths = length_mix(args.texts, args.seed)
    cfg = SIZES[args.size]
    seqs = synthetic_ids(lengths, cfg.vocab_size, args.seed)
    warm_seqs = warm_up_ids(args.texts, cfg.vocab_size, args.seed)
    base_pad = padding_stats(lengths, fixed_size_batches(lengths, BASELINE_BATCH)).waste
    results, pooled_by_dtype = [], {}
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name, device)
        if device.type == "cpu" and dtype == torch.bfloat16 and not has_bf16_matmul():
            print(f"skip {name}: this CPU has no AVX-512 BF16/AMX")
            continue
        dtype_name = str(dtype).removeprefix("torch.")
        roofline = matmul_roofline(cfg, dtype, device)
        model = random_encoder(cfg, seed=0, device=device, dtype=dtype)
        budget = args.max_tokens or default_max_tokens(device.type, dtype_name)
        # varlen attention on CUDA in half precision has no padding at all
        ours_pad = (0.0 if device.type == "cuda"
                    else attention_padding(lengths, plan_batches(lengths, budget)))
        common = {"dtype": dtype_name, "device": str(device), "max_tokens_per_batch": budget}
        packed, pooled = measure("packed", lambda s: run_packed(model, s, budget, device),
                                 seqs, warm_seqs, cfg, device, args.repeats)
        pooled_by_dtype[dtype_name] = pooled
        results.append(common | packed | {"matmul_padding": 0.0, "attention_padding":
                                          round(ours_pad, 4)} | roofline)
        if not args.no_baseline:
            base, _ = measure("baseline", lambda s: run_baseline(model, s, device), seqs,
                              warm_seqs, cfg, device, args.repeats)
            results.append(common | base | {"max_tokens_per_batch": f"{BASELINE_BATCH} seqs",
                                            "matmul_padding": round(base_pad, 4),
                                            "attention_padding": round(base_pad, 4)} | roofline)
        del model
    for r in results:
        r["of_roofline"] = round(r["tokens_per_s"] / r["roofline_tokens_per_s"], 3)
        fp32 = pooled_by_dtype.get("float32")
        if r["path"] == "packed" and r["dtype"] != "float32" and fp32 is not None:
            r["min_cosine_to_float32"] = round(min_cosine(pooled_by_dtype[r["dtype"]], fp32), 6)
    return results


def print_table(results: list[dict], header: dict) -> None:
    print(json.dumps(header))
    cols = ["device", "dtype", "path", "max_tokens_per_batch", "tokens", "seconds", "tokens_per_s",
            "tokens_per_s_seen", "matmul_tflops", "roofline_tokens_per_s", "of_roofline",
            "min_cosine_to_float32", "matmul_padding", "attention_padding", "peak_mem_gib", "mfu"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    base = {r["dtype"]: r for r in results if r["path"] == "baseline"}
    fp32_base = base.get("float32")
    for r in results:
        if r["path"] == "packed":
            print(f"{r['dtype']}: matmul roofline here {r['matmul_tflops']} TFLOP/s = "
                  f"{r['roofline_tokens_per_s']:,.0f} tokens/s; packed reached "
                  f"{r['tokens_per_s']:,.0f} tokens/s on shapes not seen before = "
                  f"{r['of_roofline']:.0%} of it")
            if "min_cosine_to_float32" in r:
                print(f"{r['dtype']}: lowest per-text cosine to float32 = "
                      f"{r['min_cosine_to_float32']}")
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
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of the same texts; the first meets unseen shapes, "
                        "the others time the shapes seen (tokens_per_s_seen)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--int8", action="store_true",
                        help="also time int8 matmuls at the model's shapes (torch._int_mm, "
                        "nothing quantized) beside bf16's: the ceiling of an int8 encoder")
    parser.add_argument("--json", help="also write the results to this file")


def main(args) -> None:
    if args.dtypes is None:
        args.dtypes = "bfloat16" if resolve_device(args.device).type == "cuda" else "float32,bfloat16"
    results = bench_encoder(args)
    header = {"benchmark": "encoder", "model": args.size, "date": datetime.date.today().isoformat(),
              "machine": machine(), "cpu_features": list(cpu_features()),
              "texts": args.texts,
              "median_len": float(np.median(length_mix(args.texts, args.seed)))}
    if args.int8:
        device = resolve_device(args.device)
        header["int8_matmul"] = int8_matmul_ceiling(SIZES[args.size], device)
    print_table(results, header)
    if "int8_matmul" in header:
        probe = header["int8_matmul"]
        print("int8 matmuls (torch._int_mm, nothing quantized): " + (
            f"{probe['int8_matmul_tops']} TOPS against bf16's {probe['bfloat16_matmul_tflops']} "
            f"TFLOP/s timed beside them = {probe['vs_bfloat16_matmuls']}x bf16's matmuls here"
            if "error" not in probe else probe["error"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)
