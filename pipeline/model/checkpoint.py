"""Loading the official checkpoint (hub layout, safetensors only) into our encoder.

The key map below is the whole contract between the hub's flat key names (model-spec section 2)
and our module. Loading is exhaustive: every expected key present, no unexpected key, every
shape equal; the only reshape is the stacked expert matrices ``[E*F, D] -> [E, F, D]``.
Pickle checkpoints (``*.bin``, ``*.pt``, ...) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .config import EncoderConfig, load_config
from .encoder import NomicMoEEncoder
from .expert_parallel import ExpertGroup

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint does not match the architecture its config.json describes."""


Transform = Callable[[torch.Tensor], torch.Tensor]


EXPERT_WEIGHTS = ("ffn.w1_EFD", "ffn.w2_EFD")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _experts(cfg: EncoderConfig) -> Transform:
    # [E*F, D] with the expert axis outer; both w1 and w2 are viewed as [E, F, D]. Viewing w2 as
    # [E, D, F] is shape-compatible and silently wrong (model-spec section 2).
    return lambda t: t.reshape(cfg.num_experts, cfg.ffn_size, cfg.hidden_size)


# The router stays fp32 at every compute dtype (model-spec section 6). On the CPU, in half
# precision, so do the parameters the residual stream meets outside the matmuls (LayerNorms,
# the token-type row): the model code keeps the stream in their dtype, so only the matmuls
# (their weights, inputs and outputs) and attention run in bf16, and the residual sums and
# norms in fp32. A bf16 stream rounds every residual sum to 8 bits and, through the router's
# near-ties, sends some tokens to other experts: per-text cosine to fp32 0.9937 at worst on
# the encoder benchmark's mix, 0.9984 with the fp32 stream, for ~5% of bf16 speed (2-core AMD
# EPYC; docs/encoder.md#half-precision-on-the-cpu). On GPUs the stream stays in the compute
# dtype: there the extra memory traffic of an fp32 stream has not been measured yet.
FP32_PARAMS = ("router_ED",)
FP32_STREAM_PARAMS = ("norm.weight", "norm.bias", "norm1.weight", "norm1.bias",
                      "norm2.weight", "norm2.bias", "token_type_embeddings.weight")


def param_dtype(name: str, dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype parameter ``name`` (ours) is stored in when the model computes in ``dtype``
    on a ``device_type`` device."""
    if name.endswith(FP32_PARAMS) or (device_type == "cpu" and name.endswith(FP32_STREAM_PARAMS)):
        return torch.float32
    return dtype


def key_map(cfg: EncoderConfig) -> list[tuple[str, str, tuple[int, ...], Transform]]:
    """``(our parameter, hub key, hub shape, hub -> ours)`` for every tensor of the checkpoint."""
    D, F, E, V = cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.vocab_size
    rows: list[tuple[str, str, tuple[int, ...], Transform]] = [
        ("word_embeddings.weight", "embeddings.word_embeddings.weight", (V, D), _identity),
        ("token_type_embeddings.weight", "embeddings.token_type_embeddings.weight",
         (cfg.type_vocab_size, D), _identity),
        ("emb_norm.weight", "emb_ln.weight", (D,), _identity),
        ("emb_norm.bias", "emb_ln.bias", (D,), _identity),
    ]
    for i in range(cfg.num_layers):
        ours, hub = f"layers.{i}.", f"encoder.layers.{i}."
        rows += [
            (ours + "attn.qkv.weight", hub + "attn.Wqkv.weight", (3 * D, D), _identity),
            (ours + "attn.qkv.bias", hub + "attn.Wqkv.bias", (3 * D,), _identity),
            (ours + "attn.out.weight", hub + "attn.out_proj.weight", (D, D), _identity),
            (ours + "attn.out.bias", hub + "attn.out_proj.bias", (D,), _identity),
            (ours + "norm1.weight", hub + "norm1.weight", (D,), _identity),
            (ours + "norm1.bias", hub + "norm1.bias", (D,), _identity),
            (ours + "norm2.weight", hub + "norm2.weight", (D,), _identity),
            (ours + "norm2.bias", hub + "norm2.bias", (D,), _identity),
        ]
        if cfg.is_moe_layer(i):
            rows += [
                (ours + "ffn.router_ED", hub + "mlp.router.layer.weight", (E, D), _identity),
                (ours + "ffn.w1_EFD", hub + "mlp.experts.mlp.w1", (E * F, D), _experts(cfg)),
                (ours + "ffn.w2_EFD", hub + "mlp.experts.mlp.w2", (E * F, D), _experts(cfg)),
                (ours + "ffn.bias_D", hub + "mlp.experts.bias", (D,), _identity),
            ]
        else:
            rows += [
                (ours + "ffn.fc1.weight", hub + "mlp.fc1.weight", (F, D), _identity),
                (ours + "ffn.fc1.bias", hub + "mlp.fc1.bias", (F,), _identity),
                (ours + "ffn.fc2.weight", hub + "mlp.fc2.weight", (D, F), _identity),
                (ours + "ffn.fc2.bias", hub + "mlp.fc2.bias", (D,), _identity),
            ]
    return rows


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a hub-layout model directory (single file or sharded)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing}")
        return files
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("model-*.safetensors"))
    if shards:
        raise CheckpointError(f"{model_dir} has sharded safetensors but no {SAFETENSORS_INDEX}")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle checkpoints {pickles}; refusing to load them because "
            "unpickling can execute arbitrary code. Convert the weights to safetensors "
            f"({SAFETENSORS_FILE}) or use the official checkpoint, which ships safetensors."
        )
    raise CheckpointError(f"no {SAFETENSORS_FILE} (or sharded safetensors) in {model_dir}")


def checkpoint_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """``key -> (file, shape)`` for every tensor, read from the safetensors headers only."""
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in index:
                    raise CheckpointError(f"key {key!r} appears in {index[key][0]} and {path}")
                index[key] = (path, tuple(f.get_slice(key).get_shape()))
    return index


def load_state_dict(
    cfg: EncoderConfig, files: list[Path], device: torch.device, dtype: torch.dtype,
    experts: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Read, check and convert every checkpoint tensor into our parameter names.

    With ``experts = (lo, hi)`` only those experts' rows of the stacked expert matrices are
    read from the files (an expert-parallel rank's share); every other tensor is read whole.
    """
    rows = key_map(cfg)
    index = checkpoint_index(files)
    expected = {hub for _, hub, _, _ in rows}
    missing = sorted(expected - set(index))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} key(s), first: {missing[:5]}")
    unexpected = sorted(set(index) - expected)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected key(s) for this config, first: "
            f"{unexpected[:5]} (is config.json from the same model?)"
        )
    for _, hub, shape, _ in rows:
        if index[hub][1] != shape:
            raise CheckpointError(
                f"key {hub!r} has shape {list(index[hub][1])}, expected {list(shape)}"
            )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for ours, hub, _, transform in rows:
                if index[hub][0] != path:
                    continue
                if experts is not None and ours.endswith(EXPERT_WEIGHTS):
                    lo, hi = experts  # [E*F, D] rows, expert-major: read only this range
                    part = f.get_slice(hub)[lo * cfg.ffn_size : hi * cfg.ffn_size]
                    tensor = part.reshape(hi - lo, cfg.ffn_size, cfg.hidden_size)
                    transform = _identity
                else:
                    tensor = f.get_tensor(hub)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"key {hub!r} has dtype {tensor.dtype}, expected float")
                want = param_dtype(ours, dtype, torch.device(device).type)
                state[ours] = transform(tensor).to(device=device, dtype=want).contiguous()
    return state


def load_encoder(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    moe_backend: str = "auto",
    placement: ExpertGroup | None = None,
) -> NomicMoEEncoder:
    """Load a hub-layout model directory (``config.json`` + safetensors) into an encoder.

    Returns an eval-mode :class:`NomicMoEEncoder` on ``device`` with activations in ``dtype``
    (router in fp32). ``encoder(input_ids, attention_mask)`` maps right-padded ``[B, L]``
    tensors to last hidden states ``[B, L, D]``. With ``placement`` it is one rank of an
    expert-parallel group and loads only that rank's experts.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
    cfg = load_config(model_dir)
    experts = placement.experts(cfg.num_experts) if placement else None
    state = load_state_dict(cfg, weight_files(model_dir), device, dtype, experts)
    return encoder_from_state(cfg, state, moe_backend, placement)


def encoder_from_state(
    cfg: EncoderConfig, state: dict[str, torch.Tensor], moe_backend: str = "auto",
    placement: ExpertGroup | None = None,
) -> NomicMoEEncoder:
    """Build the module on the meta device and assign ``state`` (our names) into it."""
    with torch.device("meta"):
        model = NomicMoEEncoder(cfg, moe_backend, placement)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
