"""The CUDA path of the forward pass, checked without a GPU.

The real-size encoder runs on the meta device (shapes and dtypes, no data) with the meta device
taking the CUDA kernels (``layers.CUDA_KERNEL_DEVICES``): flash varlen attention and grouped
expert matmuls in bf16, varlen attention and the per-expert loop in fp16. A dispatch mode sees
every aten op of the forward, mean pooling and Matryoshka widths: each output must stay on the
device, in the run's dtype or an index/fp32 dtype, and no op may read device data on the host
(``.item()``, ``bool(t)``, ``nonzero``, ``bincount``, a copy to the CPU: each a device sync on
CUDA, which stalls the pipeline's overlap of copies and compute).
"""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.model import PackedBatch, layers, matryoshka, mean_pool, moe
from pipeline.model.builder import REAL_CONFIG
from pipeline.model.checkpoint import encoder_from_state, param_dtype
from pipeline.model.encoder import NomicMoEEncoder
from pipeline.model.staging import DeviceStaging

aten = torch.ops.aten
# Ops whose result depends on device data in a way the host must see (a sync on CUDA).
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.equal, aten.is_nonzero,
              aten.bincount, aten.masked_select, aten._unique2, aten.unique_consecutive,
              aten.unique_dim, aten.repeat_interleave, aten.histc}
LENGTHS = [3, 117, 512, 40, 1, 260, 96]


class HostSync(AssertionError):
    """An op of the forward pass read device data on the host."""


class StepCheck(TorchDispatchMode):
    """Every aten op's outputs: on ``device``, in ``allowed`` dtypes; no host read."""

    def __init__(self, device: torch.device, dtype: torch.dtype, host_work: bool = False) -> None:
        super().__init__()
        self.device = device
        # With host_work, ops on host data alone may make host tensors (packing ids on the CPU)
        self.host_work = host_work
        # uint64: flash attention's RNG state (seed, offset), returned beside its output
        self.allowed = {dtype, torch.float32, torch.int64, torch.int32, torch.bool, torch.uint64}
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_READS:
            raise HostSync(f"{func} reads device data on the host (a device sync on CUDA)")
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self.host_work and all(t.device.type == "cpu" for t in inputs):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.device != self.device:
                    raise HostSync(f"{func} put a tensor on {t.device}, off {self.device}")
                assert t.dtype in self.allowed, f"{func} made a {t.dtype} tensor"
        self.ops.append(str(func))
        return out


def meta_encoder(dtype: torch.dtype) -> NomicMoEEncoder:
    """The real-size encoder on the meta device, computing in ``dtype``, each parameter in the
    dtype the loaders give it on a GPU (``param_dtype``: routers fp32)."""
    with torch.device("meta"):
        shapes = NomicMoEEncoder(REAL_CONFIG).state_dict()
    state = {k: torch.empty(v.shape, device="meta", dtype=param_dtype(k, dtype, "cuda"))
             for k, v in shapes.items()}
    return encoder_from_state(REAL_CONFIG, state)


@pytest.fixture
def cuda_path(monkeypatch):
    """The meta device takes the CUDA kernels (what ``device.type == "cuda"`` selects)."""
    monkeypatch.setattr(layers, "CUDA_KERNEL_DEVICES", {"cuda", "meta"})
    monkeypatch.setattr(moe, "CUDA_KERNEL_DEVICES", {"cuda", "meta"})


def run_checked(model: NomicMoEEncoder, lengths=LENGTHS):
    """forward_packed, mean pooling and two Matryoshka widths under :class:`StepCheck`,
    every module's output checked by a hook too."""
    cfg, device = model.config, torch.device("meta")
    T, D = sum(lengths), cfg.hidden_size
    ids = np.concatenate([np.random.default_rng(n).integers(4, 1000, n) for n in lengths])
    batch = PackedBatch.from_lengths_and_ids(ids, np.array(lengths)).to(device)
    seen = []

    def hook(module, _, out):
        widths = {"qkv": 3 * D, "fc1": cfg.ffn_size}
        name = names[module]
        want = (T, widths.get(name.rsplit(".", 1)[-1], D))
        assert out.shape == want and out.dtype == model.dtype and out.device == device, name
        seen.append(name)

    names = {m: n for n, m in model.named_modules() if n and not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    routing, hidden = [], []
    check = StepCheck(device, model.dtype)
    try:
        with torch.inference_mode(), check:
            x_TD = model.forward_packed(batch, routing_out=routing, hidden_out=hidden)
            vectors = matryoshka(mean_pool(x_TD, batch), (768, 256))
    except (RuntimeError, NotImplementedError) as err:
        # .item(), .tolist() and copies to the host stop before the dispatcher on meta tensors
        if "meta" not in str(err):
            raise
        raise HostSync(f"the forward pass read device data on the host: {err}") from err
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(names) - 1  # every leaf module but the token-type table ran
    assert [h.shape for h in hidden] == [(T, D)] * (cfg.num_layers + 1)
    assert all(h.dtype == model.dtype and h.device == device for h in hidden)
    for r in routing:
        assert r.topk_ids_TK.shape == (T, cfg.top_k) and r.topk_ids_TK.dtype == torch.int64
        assert r.topk_weights_TK.dtype == r.probs_TE.dtype == torch.float32
        assert r.probs_TE.shape == (T, cfg.num_experts)
    assert {d: (v.shape, v.dtype, v.device) for d, v in vectors.items()} == {
        768: ((len(lengths), 768), torch.float32, device),
        256: ((len(lengths), 256), torch.float32, device)}
    return check.ops


def count(ops, name):
    return sum(name in op for op in ops)


def test_bf16_cuda_path_runs_varlen_and_grouped_without_host_sync(cuda_path):
    model = meta_encoder(torch.bfloat16)
    ops = run_checked(model)
    moe_layers = len(REAL_CONFIG.moe_layers)
    assert count(ops, "varlen_attn") == REAL_CONFIG.num_layers
    assert count(ops, "grouped_mm") == 2 * moe_layers  # w1 and w2 of every MoE layer
    assert count(ops, "scaled_dot_product") == 0 and count(ops, "aten.mm.") == 0


def test_fp16_cuda_path_reads_only_the_expert_counts(cuda_path, monkeypatch):
    """grouped_mm has no fp16 kernel: fp16 runs the per-expert loop, whose one host read
    (the rows per expert, twice per MoE layer) is ``moe.host_counts``; nothing else syncs."""
    reads = []

    def even_split(counts_E):
        reads.append(counts_E.shape)
        slots = sum(LENGTHS) * REAL_CONFIG.top_k
        return [slots // len(counts_E)] * (len(counts_E) - 1) + [
            slots - slots // len(counts_E) * (len(counts_E) - 1)]

    monkeypatch.setattr(moe, "host_counts", even_split)
    ops = run_checked(meta_encoder(torch.float16))
    assert count(ops, "varlen_attn") == REAL_CONFIG.num_layers
    assert count(ops, "grouped_mm") == 0
    assert reads == [(REAL_CONFIG.num_experts,)] * (2 * len(REAL_CONFIG.moe_layers))


def test_a_planted_item_in_the_moe_fails(cuda_path, monkeypatch):
    real_route = moe.route

    def route_with_item(x_TD, router_ED, top_k):
        routing = real_route(x_TD, router_ED, top_k)
        if routing.probs_TE.max().item() > 2:  # a data-dependent host read
            raise AssertionError("unreachable")
        return routing

    monkeypatch.setattr(moe, "route", route_with_item)
    with pytest.raises(HostSync, match=r"item\(\)"):
        run_checked(meta_encoder(torch.bfloat16))


def test_a_copy_to_the_host_fails(cuda_path, monkeypatch):
    real_gelu = moe.F.gelu
    monkeypatch.setattr(moe.F, "gelu", lambda x: real_gelu(x.cpu().to(x.device)))
    with pytest.raises(HostSync, match="meta"):
        run_checked(meta_encoder(torch.bfloat16))


def test_per_expert_counts_by_bincount_would_fail(cuda_path, monkeypatch):
    """The earlier dispatch counted rows per expert with ``bincount`` (a sync on CUDA)."""

    def with_bincount(flat_ids_S, num_experts):
        counts_E = torch.bincount(flat_ids_S, minlength=num_experts)
        return torch.argsort(flat_ids_S, stable=True), counts_E, counts_E.cumsum(0).int()

    monkeypatch.setattr(moe, "expert_slots", with_bincount)
    with pytest.raises(HostSync, match="bincount"):
        run_checked(meta_encoder(torch.bfloat16))


@pytest.mark.parametrize("E,S", [(8, 0), (8, 1), (4, 37), (8, 200)])
def test_expert_slots_equal_bincount(E, S):
    ids = torch.randint(0, E, (S,), generator=torch.Generator().manual_seed(S))
    if S > 10:
        ids[ids == 1] = 2  # an expert without slots
    order, counts, offsets = moe.expert_slots(ids, E)
    assert torch.equal(order, torch.argsort(ids, stable=True))
    assert torch.equal(counts, torch.bincount(ids, minlength=E))
    assert offsets.dtype == torch.int32 and torch.equal(offsets, counts.cumsum(0).int())


def test_cuda_selects_the_cuda_kernels():
    """What the meta runs above stand in for: CUDA in half precision, and nothing else."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    has_varlen = layers._varlen_attn() is not None
    assert layers.uses_varlen(cuda, torch.bfloat16) == layers.uses_varlen(cuda, torch.float16) \
        == has_varlen
    assert not layers.uses_varlen(cuda, torch.float32)
    assert not layers.uses_varlen(cpu, torch.bfloat16)

    def backend(device, dtype):
        return moe._resolve_backend("auto", SimpleNamespace(device=device, dtype=dtype))

    assert backend(cuda, torch.bfloat16) == ("grouped" if moe._grouped_mm else "loop")
    assert backend(cuda, torch.float16) == backend(cpu, torch.bfloat16) == "loop"


class MetaStaging(DeviceStaging):
    """The meta device's staging (plain ``.to``), with the copies back recorded instead of
    made: a meta tensor has no data to copy, and a host buffer would be a CPU op."""

    def __init__(self) -> None:
        super().__init__(torch.device("meta"))
        self.downloads = []

    def host_buffer(self, rows, cols, dtype):
        return torch.from_numpy(np.zeros((rows, cols), {torch.float16: np.float16}.get(
            dtype, np.float32)))

    def download(self, host_RC, device_RC):
        assert host_RC.shape == device_RC.shape and host_RC.dtype == device_RC.dtype
        self.downloads.append((tuple(device_RC.shape), device_RC.dtype, device_RC.device.type))


def test_the_encode_stage_on_the_cuda_path_syncs_nothing(cuda_path, tokenizer_json):
    """EncodeStage over the real-size bf16 encoder, its Embedder on the meta device taking the
    CUDA kernels: a window of rows goes through the stage; between the ids' upload and the
    vectors' copies back nothing reads device data, and only the width vectors come back, one
    copy per packed batch, cast to float16 on the device."""
    from pipeline.embedder import Embedder
    from pipeline.io import schema as S
    from pipeline.stages.embed import EncodeStage
    from pipeline.tokenize import TextTokenizer

    embedder = Embedder(meta_encoder(torch.bfloat16), TextTokenizer.from_json(tokenizer_json),
                        max_tokens_per_batch=1024)
    embedder.staging = staging = MetaStaging()
    stage = EncodeStage("unused", revision=None, device="meta", dtype="bfloat16",
                        dims=(768, 256), output_dtype="float16", max_tokens_per_batch=None,
                        engine=lambda load: embedder)
    rng = np.random.default_rng(0)
    ids = [rng.integers(4, 1000, n).astype(np.int32) for n in LENGTHS]
    table = pa.table({S.TOKENS: pa.array(ids, pa.list_(pa.int32())),
                      S.NUM_TOKENS: pa.array(LENGTHS, pa.int32()),
                      S.REJECT: pa.nulls(len(LENGTHS), pa.string())})
    check = StepCheck(torch.device("meta"), torch.bfloat16, host_work=True)
    check.allowed.add(torch.float16)
    try:
        with check:
            out = stage(table)
    except (RuntimeError, NotImplementedError) as err:  # as in run_checked
        if "meta" not in str(err):
            raise
        raise HostSync(f"the encode path read device data on the host: {err}") from err
    groups = embedder.plan(np.array(LENGTHS))
    assert len(groups) > 1 and count(check.ops, "varlen_attn") == len(groups) * 12
    assert staging.downloads == [((len(g), 768 + 256), torch.float16, "meta") for g in groups]
    assert out["embedding_768"].type == pa.list_(pa.float16(), 768)
    assert out.num_rows == len(LENGTHS)


def test_a_host_read_in_the_encode_path_fails(cuda_path, tokenizer_json, monkeypatch):
    """The stage test above fails on a planted host read after the forward (e.g. the old
    per-width ``.cpu()`` copies, or a norm read back to check it)."""
    from pipeline.model import staging as staging_module

    real = staging_module.matryoshka

    def checked(pooled_BD, dims):
        assert float(pooled_BD.norm()) >= 0  # a host read of device data
        return real(pooled_BD, dims)

    monkeypatch.setattr(staging_module, "matryoshka", checked)
    with pytest.raises(HostSync):
        test_the_encode_stage_on_the_cuda_path_syncs_nothing(None, tokenizer_json)


def test_staging_on_cuda_pins_copies_aside_and_waits_once(monkeypatch):
    """DeviceStaging's CUDA branch, its calls recorded on a CPU-only torch (``torch.cuda``'s
    streams and events stubbed, pinning recorded, the meta device as the target): ids pinned
    first, copied non-blocking inside the side stream, the compute stream (not the host) waits
    on the copy's event and records the tensors' use; vectors come back non-blocking into
    pinned buffers; the host synchronises once, in ``wait``. Whether the copies overlap the
    kernels only a GPU shows (``python -m pipeline.bench gpu``, section sync_free)."""
    calls = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_event(self, event):
            calls.append(("wait_event", self.name, event.stream))

        def synchronize(self):
            calls.append(("synchronize", self.name))

    class Event:
        def record(self, stream):
            self.stream = stream.name
            calls.append(("record", stream.name))

    class Within:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            calls.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            calls.append(("exit", self.stream.name))

    compute = Stream("compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", Within)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t.clone())
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: calls.append(("record_stream", s.name)))
    real_to, real_copy, real_empty = torch.Tensor.to, torch.Tensor.copy_, torch.empty

    def to(t, device, non_blocking=False):
        calls.append(("to", str(device), non_blocking))
        return real_to(t, device, non_blocking=non_blocking)

    def copy_(t, src, non_blocking=False):
        calls.append(("copy_back", non_blocking))
        return real_copy(t, src)

    def empty(*shape, pin_memory=False, **kw):
        calls.append(("host_buffer", pin_memory))
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch, "empty", empty)
    staging = DeviceStaging(torch.device("meta"), overlap=True)
    packed = staging.pin(PackedBatch.from_lengths_and_ids(np.arange(7), np.array([3, 4])))
    assert calls == ["pin"] * 4
    calls.clear()
    batch = staging.ready(staging.upload(packed))
    assert batch.input_ids_T.device.type == "meta"
    assert calls == [("enter", "side"), *[("to", "meta", True)] * 4, ("record", "side"),
                     ("exit", "side"), ("wait_event", "compute", "side"),
                     *[("record_stream", "compute")] * 4]
    calls.clear()
    host = staging.host_buffer(2, 3, torch.float16)
    staging.download(host, torch.ones(2, 3, dtype=torch.float16))
    staging.wait()
    assert calls == [("host_buffer", True), ("copy_back", True), ("synchronize", "compute")]
