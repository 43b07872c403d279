"""The packed encoder against the slow padded reference, on several shapes of random model."""

import numpy as np
import pytest
import torch

from pipeline.model import EncoderConfig, PackedBatch
from pipeline.model.builder import random_encoder
from pipeline.model.checkpoint import encoder_from_state, param_dtype
from pipeline.model.pooling import mean_pool
from pipeline.model.moe import grouped_experts, route
from pipeline.model.reference import expert_loop_moe, padded_forward, per_token_moe

SHAPES = {
    "fixture-like": EncoderConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4,
                                  ffn_size=128, num_experts=4, top_k=2),
    "8-heads-8-experts": EncoderConfig(vocab_size=300, hidden_size=64, num_layers=2,
                                       num_heads=8, ffn_size=48, num_experts=8, top_k=2),
    "3-experts-top1": EncoderConfig(vocab_size=128, hidden_size=48, num_layers=4, num_heads=2,
                                    ffn_size=32, num_experts=3, top_k=1, moe_every=3),
    "top3": EncoderConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=1,
                          ffn_size=64, num_experts=5, top_k=3),
}


def random_padded(cfg, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, cfg.vocab_size, (n,), generator=gen)
        ids[b, 0], ids[b, n - 1] = 0, 2
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_packed_equals_padded_reference(name):
    cfg = SHAPES[name]
    model = random_encoder(cfg, seed=3)
    ids, mask = random_padded(cfg, [1, 7, 33, 2, 70, 19])
    with torch.no_grad():
        got = model(ids, mask)
    want = padded_forward(model, ids, mask)
    assert (got - want)[mask.bool()].abs().max() < 1e-5


def test_each_sequence_alone_in_any_batch_and_order():
    cfg = SHAPES["fixture-like"]
    model = random_encoder(cfg, seed=1)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, cfg.vocab_size, n).tolist() for n in (5, 40, 1, 17, 17, 90)]
    with torch.no_grad():
        together = model.forward_packed(PackedBatch.from_sequences(seqs))
        cu = np.cumsum([0] + [len(s) for s in seqs])
        for i, s in enumerate(seqs):
            alone = model.forward_packed(PackedBatch.from_sequences([s]))
            assert (alone - together[cu[i] : cu[i + 1]]).abs().max() < 1e-5
        order = rng.permutation(len(seqs))
        shuffled = model.forward_packed(PackedBatch.from_sequences([seqs[i] for i in order]))
        cu2 = np.cumsum([0] + [len(seqs[i]) for i in order])
        for j, i in enumerate(order):
            assert (shuffled[cu2[j] : cu2[j + 1]] - together[cu[i] : cu[i + 1]]).abs().max() < 1e-5


def test_pad_ids_under_the_mask_change_nothing():
    cfg = SHAPES["fixture-like"]
    model = random_encoder(cfg, seed=2)
    ids, mask = random_padded(cfg, [3, 12, 30])
    noisy = torch.where(mask.bool(), ids, torch.randint(0, cfg.vocab_size, ids.shape))
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(noisy, mask))


def test_left_padding_is_refused():
    model = random_encoder(SHAPES["top3"], seed=0)
    ids = torch.tensor([[1, 0, 5, 2]])
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, torch.tensor([[0, 1, 1, 1]]))


def test_bf16_close_to_fp32():
    cfg = SHAPES["fixture-like"]
    fp32 = random_encoder(cfg, seed=4)
    bf16 = random_encoder(cfg, seed=4, dtype=torch.bfloat16)
    assert bf16.layers[1].ffn.router_ED.dtype == torch.float32
    assert bf16.layers[1].ffn.w1_EFD.dtype == torch.bfloat16
    ids, mask = random_padded(cfg, [12, 50, 3, 31])
    with torch.no_grad():
        a = fp32(ids, mask).float()
        b = bf16(ids, mask).float()
    m = mask.bool()[..., None]
    pa, pb = (a * m).sum(1), (b * m).sum(1)
    cos = torch.nn.functional.cosine_similarity(pa, pb, dim=-1)
    assert cos.min() >= 0.999


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("E,K,T", [(4, 2, 37), (8, 2, 5), (6, 3, 1), (3, 1, 64)])
def test_grouped_moe_equals_per_token_loop(backend, E, K, T):
    if backend == "grouped" and getattr(torch.nn.functional, "grouped_mm", None) is None:
        pytest.skip("this torch has no grouped_mm")
    cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_size=24,
                        num_experts=E, top_k=K)
    moe = random_encoder(cfg, seed=E * 10 + T, moe_backend=backend).layers[1].ffn
    h = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = moe(h)
        assert (got - per_token_moe(moe, h)).abs().max() < 1e-5
        assert (got - expert_loop_moe(moe, h)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_experts_without_tokens(backend):
    """Force routing onto experts 0 and 2 only: experts 1 and 3 get no token at all."""
    cfg = EncoderConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=8,
                        num_experts=4, top_k=2)
    moe = random_encoder(cfg, seed=0, moe_backend=backend).layers[1].ffn
    with torch.no_grad():
        moe.router_ED.zero_()
        moe.router_ED[0, 0], moe.router_ED[2, 1] = 5.0, 5.0
        h = torch.randn(9, 16).abs()  # positive features: experts 0 and 2 always win
        routing = route(h, moe.router_ED, 2)
        assert set(routing.topk_ids_TK.unique().tolist()) == {0, 2}
        got = moe(h)
        assert (got - per_token_moe(moe, h)).abs().max() < 1e-5
        empty = grouped_experts(h[:0], route(h[:0], moe.router_ED, 2), moe.w1_EFD, moe.w2_EFD,
                                backend)
        assert empty.shape == (0, 16)


def test_moe_runs_each_expert_only_on_its_tokens(monkeypatch):
    """Grouped dispatch does T*K expert-rows of work, never T*E."""
    from pipeline.model import moe as moe_mod

    cfg = SHAPES["8-heads-8-experts"]
    moe = random_encoder(cfg, seed=0, moe_backend="loop").layers[1].ffn
    rows = []
    real_mm = torch.mm
    monkeypatch.setattr(moe_mod.torch, "mm", lambda a, b, **kw: rows.append(a.shape[0]) or real_mm(a, b, **kw))
    with torch.no_grad():
        moe(torch.randn(50, cfg.hidden_size))
    assert sum(rows) == 2 * 50 * cfg.top_k  # w1 and w2 passes over T*K slots


def test_bf16_on_the_cpu_keeps_the_residual_stream_in_fp32():
    """On the CPU in bf16 only the matmuls and attention run in bf16; the stream between them
    (residual sums, LayerNorms) stays fp32, which keeps it closer to fp32 than the all-bf16
    layout that GPUs use, on the same weights and texts."""
    cfg = SHAPES["fixture-like"]
    fp32 = random_encoder(cfg, seed=4)
    mixed = random_encoder(cfg, seed=4, dtype=torch.bfloat16)
    assert mixed.layers[0].norm1.weight.dtype == mixed.emb_norm.bias.dtype == torch.float32
    assert mixed.layers[0].attn.qkv.weight.dtype == mixed.word_embeddings.weight.dtype \
        == mixed.layers[1].ffn.w2_EFD.dtype == mixed.dtype == torch.bfloat16
    on_gpu = encoder_from_state(cfg, {k: v.to(param_dtype(k, torch.bfloat16, "cuda"))
                                      for k, v in fp32.state_dict().items()})
    assert on_gpu.layers[0].norm1.weight.dtype == torch.bfloat16
    assert on_gpu.layers[1].ffn.router_ED.dtype == torch.float32
    rng = np.random.default_rng(3)
    batch = PackedBatch.from_sequences(
        [rng.integers(4, cfg.vocab_size, n) for n in (5, 17, 40, 64, 9, 33, 120, 2)])
    with torch.no_grad():
        hidden = []
        got = mean_pool(mixed.forward_packed(batch, hidden_out=hidden), batch)
        assert [h.dtype for h in hidden] == [torch.float32] * (cfg.num_layers + 1)
        want = mean_pool(fp32.forward_packed(batch), batch)
        all_bf16 = mean_pool(on_gpu.forward_packed(batch), batch)
    err = 1 - torch.nn.functional.cosine_similarity(got, want, dim=-1)
    err_all_bf16 = 1 - torch.nn.functional.cosine_similarity(all_bf16, want, dim=-1)
    assert err.max() < 1e-3 and err.mean() < err_all_bf16.mean() / 2
