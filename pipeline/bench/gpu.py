"""``python -m pipeline.bench gpu [--json FILE]``: everything a lent GPU should measure, in one
command (no Ray, no network; ~2-3 minutes on one H100).

Sections, each timed and recorded on its own (one that fails is reported with its error, the
others still run; the command exits 1 when any failed):

* ``parity``: the parity fixture (``tests/fixtures/nomic-moe-tiny``, the hub code's outputs) in
  fp32 on the device against the CPU and against the hub's values;
* ``sync_free``: one bf16 forward pass, pooling and widths under
  ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), then the encode stage's
  device phase (pinned uploads on a side stream, float16 widths back non-blocking) likewise;
* ``bf16_cosine``: bf16 against fp32 pooled vectors on the real-size random model;
* ``budgets``: the packed encoder's tokens/s, MFU and peak memory at each token budget;
* ``moe_backends``: grouped expert matmuls against the per-expert loop (one MoE layer, and the
  whole encoder);
* ``attention``: flash varlen against padded SDPA grids (length runs, and one grid a batch);
* ``baseline``: the hub-style path (batches of 32 padded, masked attention, expert loop) beside
  the packed path;
* ``stage``: the pipeline's path without Ray: ``TokenizeStage`` then ``EncodeStage`` on
  windows of realistic multilingual texts (real-size tokenizer), against the encoder alone.

``--device cpu --size tiny`` runs the same code on the CPU in seconds (the CUDA-only parts are
reported as skipped): what the test suite runs.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..batching import plan_batches
from ..config import parse_int_list
from ..embedder import resolve_device, resolve_dtype
from ..io import schema as S
from ..model import PackedBatch, lexicon, load_encoder, matryoshka, mean_pool
from ..model.builder import SIZES, build_model_dir, random_encoder
from ..model.checkpoint import encoder_from_state, param_dtype
from ..model.layers import AttentionPlan, packed_attention, uses_varlen
from ..model.moe import MoEFFN
from ..model.staging import DeviceStaging, encode_packed
from ..plan import WINDOW_ROWS
from ..stages.embed import EncodeStage, TokenizeStage
from .encoder import _peak_memory_gib, _reset_peak_memory, _sync, measure, run_baseline, run_packed
from .tokenizer import rows
from .workload import (lexicon_source, length_mix, machine, multilingual_texts, synthetic_ids,
                       warm_up_ids)

PARITY_FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "nomic-moe-tiny"
PARITY_TOL = 1e-4  # fp32 on a GPU: other kernels and summation orders than the CPU's
SECTIONS = ("parity", "sync_free", "bf16_cosine", "budgets", "moe_backends", "attention",
            "baseline", "stage")


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--dtype", default="bfloat16",
                        help="the low-precision dtype measured (float16 too; float32 on a CPU "
                             "without bf16 matmuls, for a quick run)")
    parser.add_argument("--texts", type=int, default=2048, help="sequences of the length mix")
    parser.add_argument("--budgets", default="16384,32768,65536",
                        help="token budgets per batch for 'budgets'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage-texts", type=int, default=16384,
                        help="multilingual texts through the stages")
    parser.add_argument("--lexicon", choices=lexicon.SOURCES, default="auto")
    parser.add_argument("--parity-dir", default=str(PARITY_FIXTURE))
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")


def cast_encoder(model, dtype: torch.dtype):
    """A copy of ``model`` computing in ``dtype`` (:func:`param_dtype`'s rule)."""
    state = {k: v.to(param_dtype(k, dtype, model.device.type))
             for k, v in model.state_dict().items()}
    return encoder_from_state(model.config, state)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall seconds of ``fn`` over ``repeats`` after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def pooled_vectors(model, seqs, budget: int) -> torch.Tensor:
    """Mean-pooled fp32 vectors ``[N, D]`` of ``seqs`` in input order (on the host)."""
    out = torch.empty(len(seqs), model.config.hidden_size)
    for group in plan_batches([len(s) for s in seqs], budget):
        batch = PackedBatch.from_sequences([seqs[i] for i in group]).to(model.device)
        out[torch.from_numpy(group)] = mean_pool(model.forward_packed(batch), batch).cpu()
    return out


@torch.inference_mode()
def parity(ctx) -> dict:
    fixture = Path(ctx.args.parity_dir)
    inputs = json.loads((fixture / "inputs.json").read_text())
    expected = load_file(str(fixture / "expected.safetensors"))
    ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
    real = mask.bool()
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    try:
        cpu = load_encoder(fixture, "cpu", torch.float32)(ids, mask)
        dev = load_encoder(fixture, ctx.device, torch.float32)(
            ids.to(ctx.device), mask.to(ctx.device)).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    batch, _ = PackedBatch.from_padded(ids, mask)
    pooled = mean_pool(dev[real], batch)
    result = {
        "max_abs_vs_cpu": float((dev - cpu)[real].abs().max()),
        "max_abs_vs_hub": float((dev - expected["last_hidden_state"])[real].abs().max()),
        "pooled_max_abs_vs_hub": float((pooled - expected["pooled"]).abs().max()),
        "tolerance": PARITY_TOL,
    }
    result["ok"] = max(result["max_abs_vs_hub"], result["pooled_max_abs_vs_hub"]) < PARITY_TOL
    return result


@torch.inference_mode()
def sync_free(ctx) -> dict:
    if ctx.device.type != "cuda":
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    group = plan_batches(ctx.lengths, 16384)[-1]
    batch = PackedBatch.from_sequences([ctx.seqs[i] for i in group]).to(ctx.device)
    model = ctx.model()
    matryoshka(mean_pool(model.forward_packed(batch), batch), (768, 256))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vectors = matryoshka(mean_pool(model.forward_packed(batch), batch), (768, 256))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    # The encode stage's device phase (pipeline/model/staging.py): pinned ids uploaded on the
    # side stream a batch ahead, float16 widths copied back non-blocking into pinned memory.
    staging = DeviceStaging(ctx.device)
    groups = plan_batches(ctx.lengths, 16384)[-3:]
    packed_G = [staging.pin(PackedBatch.from_sequences([ctx.seqs[i] for i in g]))
                for g in groups]
    encode_packed(model, staging, packed_G, (768, 256), torch.float16)  # warm-up
    staging.wait()
    torch.cuda.set_sync_debug_mode("error")
    try:
        start = time.perf_counter()
        host_RW, _ = encode_packed(model, staging, packed_G, (768, 256), torch.float16)
        queued_s = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode(0)
    staging.wait()
    total_s = time.perf_counter() - start
    norms = np.linalg.norm(host_RW[:, :768].float().numpy(), axis=1)
    return {"ok": True, "tokens": batch.num_tokens, "widths": sorted(vectors),
            "staged_batches": len(groups), "staged_rows": int(host_RW.shape[0]),
            "staged_pinned": bool(host_RW.is_pinned()),
            "staged_norm_max_error": round(float(np.abs(norms - 1).max()), 4),
            "staged_host_queue_s": round(queued_s, 4), "staged_total_s": round(total_s, 4)}


def bf16_cosine(ctx) -> dict:
    seqs = ctx.seqs[:512]
    fp32 = pooled_vectors(ctx.model_fp32(), seqs, 16384)
    low = pooled_vectors(ctx.model(), seqs, 16384)
    cos = F.cosine_similarity(fp32, low, dim=-1).numpy()
    return {"dtype": str(ctx.dtype).removeprefix("torch."), "texts": len(seqs),
            "cosine_min": round(float(cos.min()), 6), "cosine_median":
            round(float(np.median(cos)), 6), "cosine_mean": round(float(cos.mean()), 6)}


def budgets(ctx) -> dict:
    model, out = ctx.model(), {}
    for budget in ctx.budgets:
        out[str(budget)], _ = measure(
            "packed", lambda s: run_packed(model, s, budget, ctx.device), ctx.seqs,
            ctx.warm_seqs, model.config, ctx.device, ctx.args.repeats)
    return out


@torch.inference_mode()
def moe_backends(ctx) -> dict:
    model = ctx.model()
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, MoEFFN)]
    h_TD = torch.randn(min(ctx.budgets[0], 32768), model.config.hidden_size,
                       device=ctx.device, dtype=model.dtype)
    budget = ctx.budgets[len(ctx.budgets) // 2]
    out = {"layer_tokens": h_TD.shape[0], "encoder_budget": budget}
    try:
        for backend in ("grouped", "loop"):
            for m in moes:
                m.backend = backend
            layer_s = timed(lambda: moes[0](h_TD), ctx.device, ctx.args.repeats)
            tokens = sum(ctx.lengths)
            enc_s = timed(lambda: run_packed(model, ctx.seqs, budget, ctx.device), ctx.device,
                          ctx.args.repeats)
            out[backend] = {"layer_ms": round(layer_s * 1e3, 3),
                            "layer_tokens_per_s": round(h_TD.shape[0] / layer_s),
                            "encoder_tokens_per_s": round(tokens / enc_s)}
    finally:
        for m in moes:
            m.backend = "auto"
    out["grouped_vs_loop_encoder"] = round(
        out["grouped"]["encoder_tokens_per_s"] / out["loop"]["encoder_tokens_per_s"], 3)
    return out


@torch.inference_mode()
def attention(ctx) -> dict:
    cfg = ctx.cfg
    group = plan_batches(ctx.lengths, 32768)[len(plan_batches(ctx.lengths, 32768)) // 2]
    batch = PackedBatch.from_sequences([ctx.seqs[i] for i in group]).to(ctx.device)
    qkv = torch.randn(batch.num_tokens, 3, cfg.num_heads, cfg.head_dim, device=ctx.device,
                      dtype=ctx.dtype)
    plans = {"grid_runs": AttentionPlan.build(batch, ctx.dtype, varlen=False),
             "padded": AttentionPlan.build(batch, ctx.dtype, varlen=False, max_padding=1.0)}
    out = {"tokens": batch.num_tokens, "sequences": batch.num_seqs,
           "longest": batch.max_seqlen}
    if uses_varlen(ctx.device, ctx.dtype):
        plans = {"varlen": AttentionPlan.build(batch, ctx.dtype, varlen=True)} | plans
    else:
        out["varlen"] = {"skipped": "flash varlen needs CUDA in bf16/fp16"}
    for name, plan in plans.items():
        seconds = timed(lambda: packed_attention(qkv, plan), ctx.device, ctx.args.repeats)
        grid = sum(s.num_seqs * s.max_len for s in plan.segments) or batch.num_tokens
        out[name] = {"ms": round(seconds * 1e3, 3),
                     "tokens_per_s": round(batch.num_tokens / seconds),
                     "padding": round(1 - batch.num_tokens / grid, 4)}
    return out


def baseline(ctx) -> dict:
    model = ctx.model()
    budget = ctx.budgets[0]
    packed, _ = measure("packed", lambda s: run_packed(model, s, budget, ctx.device), ctx.seqs,
                        ctx.warm_seqs, model.config, ctx.device, ctx.args.repeats)
    hub, _ = measure("baseline", lambda s: run_baseline(model, s, ctx.device), ctx.seqs,
                     ctx.warm_seqs, model.config, ctx.device, ctx.args.repeats)
    return {"packed": packed | {"max_tokens_per_batch": budget},
            "baseline": hub | {"batch": "32 seqs padded"},
            "packed_vs_baseline": round(packed["tokens_per_s"] / hub["tokens_per_s"], 3)}


def stage(ctx) -> dict:
    args, dims = ctx.args, (768, 512, 256) if ctx.args.size == "real" else (64, 32)
    source = lexicon_source(args.lexicon)
    budget = ctx.budgets[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.size, tokenizer="real",
                                    lexicon_source=source)
        tokenize = TokenizeStage((model_dir / "tokenizer.json").read_text(), "document")
        texts = multilingual_texts(args.stage_texts, tokenize.tokenizer.untruncated(),
                                   args.seed, source)
        window = WINDOW_ROWS.get(ctx.device.type, 1024)
        tables = [rows(texts[i:i + window]) for i in range(0, len(texts), window)]
        start = time.perf_counter()
        tokenized = [tokenize(t) for t in tables]
        tokenize_s = time.perf_counter() - start
        encode = EncodeStage(str(model_dir), revision=None, device=str(ctx.device),
                             dtype=str(ctx.dtype).removeprefix("torch."), dims=dims,
                             output_dtype="float32", max_tokens_per_batch=budget,
                             # on a CPU: this process's threads, as the other sections have
                             threads=torch.get_num_threads() if ctx.device.type == "cpu" else None)
        encode(tokenized[0])  # warm-up
        _sync(ctx.device)
        start = time.perf_counter()
        encoded = [encode(t) for t in tokenized]
        _sync(ctx.device)
        encode_s = time.perf_counter() - start
        embedder = encode.embedder
        batches = [embedder.tokenizer.encode(["search_document: " + x for x in t])
                   for t in (texts[i:i + window] for i in range(0, len(texts), window))]
        start = time.perf_counter()
        for b in batches:
            embedder.embed_tokenized(b, dims)
        _sync(ctx.device)
        alone_s = time.perf_counter() - start
    tokens = int(sum(int(t[S.NUM_TOKENS].to_numpy().sum()) for t in tokenized))
    rows_out = sum(t.num_rows for t in encoded)
    return {"texts": len(texts), "rows_out": rows_out, "tokens": tokens, "window_rows": window,
            "max_tokens_per_batch": budget, "lexicon": source,
            "tokenize_stage_tokens_per_s": round(tokens / tokenize_s),
            "encode_stage_tokens_per_s": round(tokens / encode_s),
            "encoder_alone_tokens_per_s": round(tokens / alone_s),
            "encode_stage_vs_alone": round(alone_s / encode_s, 3)}


class Context:
    """What the sections share: the device, the length mix and its ids, the models (made
    once, on first use)."""

    def __init__(self, args) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.cfg = SIZES[args.size]
        self.budgets = parse_int_list(args.budgets, "--budgets")
        self.lengths = length_mix(args.texts, args.seed)
        self.seqs = synthetic_ids(self.lengths, self.cfg.vocab_size, args.seed)
        self.warm_seqs = warm_up_ids(args.texts, self.cfg.vocab_size, args.seed)
        self._fp32 = self._low = None

    def model_fp32(self):
        if self._fp32 is None:
            self._fp32 = random_encoder(self.cfg, seed=0, device=self.device)
        return self._fp32

    def model(self):
        if self._low is None:
            self._low = cast_encoder(self.model_fp32(), self.dtype)
        return self._low


def bench_gpu(args) -> dict:
    ctx = Context(args)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose among {list(SECTIONS)}")
    result = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "device": str(ctx.device), "model": args.size, "texts": args.texts,
              "tokens": int(ctx.lengths.sum()), "median_len": float(np.median(ctx.lengths)),
              "sections": {}, "failed": []}
    _reset_peak_memory(ctx.device)
    for name in wanted:
        start = time.perf_counter()
        try:
            section = globals()[name](ctx)
        except Exception as err:  # noqa: BLE001 - recorded, reported, and the exit status says so
            section = {"error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc(limit=-6)}
        if "error" in section or section.get("ok") is False:
            result["failed"].append(name)
        section["seconds"] = round(time.perf_counter() - start, 2)
        result["sections"][name] = section
        print(f"{name}: {json.dumps(section)[:400]}", flush=True)
    result["peak_mem_gib"] = round(_peak_memory_gib(ctx.device), 2)
    return result


def main(args) -> None:
    result = bench_gpu(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if result["failed"]:
        raise SystemExit(f"failed sections: {result['failed']}")
