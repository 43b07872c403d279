"""Parity with the hub reference's outputs on the shared tiny fixture (fp32, CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.model import PackedBatch, load_encoder, matryoshka, mean_pool

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture(parity_fixture_dir):
    inputs = json.loads((parity_fixture_dir / "inputs.json").read_text())
    ids = torch.tensor(inputs["input_ids"])
    mask = torch.tensor(inputs["attention_mask"])
    expected = load_file(str(parity_fixture_dir / "expected.safetensors"))
    return load_encoder(parity_fixture_dir), ids, mask, expected


def test_last_hidden_state_through_load_encoder(fixture):
    encoder, ids, mask, expected = fixture
    with torch.no_grad():
        hidden = encoder(ids, mask)
    real = mask.bool()
    assert hidden.shape == expected["last_hidden_state"].shape
    assert (hidden - expected["last_hidden_state"])[real].abs().max() < TOL


def test_every_layer_and_routing(fixture):
    encoder, ids, mask, expected = fixture
    batch, flat = PackedBatch.from_padded(ids, mask)
    routing, hidden = [], []
    with torch.no_grad():
        encoder.forward_packed(batch, routing_out=routing, hidden_out=hidden)
    names = ["emb_ln"] + [f"layer_{i}" for i in range(encoder.config.num_layers)]
    for name, got in zip(names, hidden, strict=True):
        want = expected[f"hidden_states.{name}"].reshape(-1, got.shape[-1])[flat]
        assert (got - want).abs().max() < TOL, name
    for layer, r in zip(encoder.config.moe_layers, routing, strict=True):
        want_ids = expected[f"router.layer_{layer}.topk_experts"].reshape(-1, 2)[flat].long()
        assert torch.equal(r.topk_ids_TK.sort(-1).values, want_ids.sort(-1).values), layer
        want_w = expected[f"router.layer_{layer}.topk_weights"].reshape(-1, 2)[flat]
        assert (r.topk_weights_TK - want_w).abs().max() < TOL
        want_p = expected[f"router.layer_{layer}.probs"].reshape(-1, 4)[flat]
        assert (r.probs_TE - want_p).abs().max() < TOL


def test_pooled_embeddings_and_matryoshka(fixture):
    encoder, ids, mask, expected = fixture
    batch, _ = PackedBatch.from_padded(ids, mask)
    with torch.no_grad():
        pooled = mean_pool(encoder.forward_packed(batch), batch)
    assert (pooled - expected["pooled"]).abs().max() < TOL
    widths = matryoshka(pooled, (64, 32))
    assert (widths[64] - expected["embeddings"]).abs().max() < TOL
    assert (widths[32] - expected["embeddings_matryoshka"]).abs().max() < TOL


def test_fixture_catches_a_known_mistake(fixture):
    """The check above can fail: reading w2 as (E, H, F) breaks parity by far more than TOL."""
    encoder, ids, mask, expected = fixture
    moe = encoder.layers[1].ffn
    original = moe.w2_EFD.data
    E, F_, D = original.shape
    moe.w2_EFD.data = original.reshape(E, D, F_).transpose(1, 2).contiguous()
    try:
        with torch.no_grad():
            hidden = encoder(ids, mask)
    finally:
        moe.w2_EFD.data = original
    assert (hidden - expected["last_hidden_state"])[mask.bool()].abs().max() > 10 * TOL
