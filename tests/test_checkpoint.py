"""Bad checkpoints fail clearly, naming what is wrong; sharded safetensors load like one file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.model import CheckpointError, UnsupportedConfigError, load_encoder


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def rewrite_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key(model_copy):
    rewrite_weights(model_copy, lambda s: s.pop("encoder.layers.3.mlp.experts.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layers\.3\.mlp\.experts\.bias"):
        load_encoder(model_copy)


def test_unexpected_key(model_copy):
    rewrite_weights(model_copy, lambda s: s.update({"pooler.dense.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*pooler\.dense\.weight"):
        load_encoder(model_copy)


def test_dense_weights_on_a_moe_layer_are_unexpected(model_copy):
    rewrite_weights(model_copy, lambda s: s.update(
        {"encoder.layers.1.mlp.fc1.weight": torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_encoder(model_copy)


def test_wrong_shape(model_copy):
    def edit(s):
        s["encoder.layers.1.mlp.experts.mlp.w2"] = s["encoder.layers.1.mlp.experts.mlp.w2"][:-1]
    rewrite_weights(model_copy, edit)
    with pytest.raises(CheckpointError, match=r"experts\.mlp\.w2.*shape \[511, 64\].*\[512, 64\]"):
        load_encoder(model_copy)


def test_unsupported_config_value(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["rotary_emb_interleaved"] = True
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="rotary_emb_interleaved"):
        load_encoder(model_copy)


def test_pickle_checkpoint_is_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*arbitrary code"):
        load_encoder(model_copy)


def test_no_weights_at_all(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_encoder(model_copy)


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(model_copy)


def test_sharded_safetensors_load_like_one_file(model_copy):
    state = load_file(str(model_copy / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(model_copy / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    one = load_encoder(model_copy)
    (model_copy / "model.safetensors").unlink()
    sharded = load_encoder(model_copy)
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_shard_named_in_index_but_absent(model_copy):
    index = {"weight_map": {"emb_ln.weight": "model-00001-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002"):
        load_encoder(model_copy)


def test_dtype_and_device_arguments(tiny_model_dir):
    enc = load_encoder(tiny_model_dir, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.layers[1].ffn.router_ED.dtype == torch.float32
    with pytest.raises(ValueError, match="float16 is supported on CUDA only"):
        load_encoder(tiny_model_dir, dtype=torch.float16)
