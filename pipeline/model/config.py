"""Encoder configuration: our own names, built from the hub's ``config.json`` in one place.

``config_from_hub`` is the only function that knows hub field names. It accepts exactly the
fields of the nomic-embed-text-v2-moe ``config.json`` (see ``model-spec.md`` section 1), and
rejects, naming field and value, any value that would change the function we compute but that
we do not implement. Unknown fields are rejected too, so that nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

# Tokens per sequence the model was fine-tuned for, including <s>, </s> and the task prefix.
MAX_SEQ_LEN = 512
# The official checkpoint on the Hugging Face Hub: the default model source everywhere.
DEFAULT_MODEL = "nomic-ai/nomic-embed-text-v2-moe"


class UnsupportedConfigError(ValueError):
    """A ``config.json`` value that this encoder does not implement."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape and numerics of a nomic-bert MoE encoder (post-norm, NeoX rotary, top-k MoE)."""

    vocab_size: int = 250048
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072  # dense FFN width and per-expert width
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 2  # MoE on layers with i % moe_every == 1
    layer_norm_eps: float = 1e-5
    rotary_base: float = 10000.0
    max_positions: int = 2048
    type_vocab_size: int = 1
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UnsupportedConfigError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head dim {self.head_dim} must be even for rotary")
        if not 1 <= self.top_k <= self.num_experts:
            raise UnsupportedConfigError(
                f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]"
            )
        if self.moe_every < 2:
            # The hub code tests `i % n == 1`, which no layer satisfies for n < 2.
            raise UnsupportedConfigError(
                f"moe_every {self.moe_every} must be >= 2 (MoE on layers with i % n == 1)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        # Hub code and every port: `i % moe_every_n_layers == 1` (odd layers for n = 2).
        return i % self.moe_every == 1

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))


# Hub fields whose value must be exactly this (they select math we implement, or math we do not).
_REQUIRED: dict[str, Any] = {
    "model_type": "nomic_bert",
    "activation_function": "gelu",  # exact erf GELU
    "prenorm": False,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "moe_normalize_expert_weights": False,
    "num_shared_experts": 0,
    "causal": False,
    "qkv_proj_bias": True,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
    "parallel_block": False,
    "parallel_block_tied_norm": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "expert_choice_router": False,
    "ffn_div": 1,
    "add_pooling_layer": False,
}
# Fields that may be absent or null but must not switch on something else.
_FALSY_OR_ABSENT = {"use_rms_norm"}
# Fields that do not change inference: dropout, training-only switches, kernels the reference
# ignores at inference, heads we do not build, bookkeeping.
_IGNORED = {
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype",
    "attn_pdrop", "resid_pdrop", "moe_resid_pdrop", "embd_pdrop", "summary_first_dropout",
    "summary_activation", "summary_proj_to_labels", "summary_type", "summary_use_proj",
    "router_aux_loss_coef", "moe_impl", "use_flash_attn", "fused_bias_fc",
    "fused_dropout_add_ln", "use_xentropy", "dense_seq_output", "initializer_range",
    "use_cache", "reorder_and_upcast_attn", "bos_token_id", "eos_token_id",
    "pad_vocab_size_multiple", "tie_word_embeddings",
}
# Hub name -> our name, for the fields that carry the shape and numerics.
_MAPPED = {
    "vocab_size": "vocab_size",
    "n_embd": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_inner": "ffn_size",
    "num_experts": "num_experts",
    "moe_top_k": "top_k",
    "moe_every_n_layers": "moe_every",
    "layer_norm_epsilon": "layer_norm_eps",
    "rotary_emb_base": "rotary_base",
    "max_trained_positions": "max_positions",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
}
# Present in the hub config and consistent with max_trained_positions; checked, not stored.
_CHECKED = {"n_positions"}

KNOWN_HUB_FIELDS = frozenset(_REQUIRED) | _FALSY_OR_ABSENT | _IGNORED | frozenset(_MAPPED) | _CHECKED


def config_from_hub(hub: Mapping[str, Any]) -> EncoderConfig:
    """Build an :class:`EncoderConfig` from a hub ``config.json`` dict, rejecting what we lack."""
    unknown = sorted(set(hub) - KNOWN_HUB_FIELDS)
    if unknown:
        raise UnsupportedConfigError(
            f"config.json has fields this encoder does not know: {unknown}; refusing to guess "
            "whether they change the model's function"
        )
    for key, want in _REQUIRED.items():
        if key in hub and hub[key] != want:
            raise UnsupportedConfigError(
                f"config.json field {key!r} = {hub[key]!r} is not supported (only {want!r})"
            )
    for key in _FALSY_OR_ABSENT:
        if hub.get(key):
            raise UnsupportedConfigError(
                f"config.json field {key!r} = {hub[key]!r} is not supported (only null/false)"
            )
    missing = sorted(k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hub)
    if missing:
        raise UnsupportedConfigError(f"config.json lacks required fields {missing}")
    if hub.get("num_experts", 0) < 1 or "moe_every_n_layers" not in hub:
        raise UnsupportedConfigError(
            "config.json describes no MoE layers (num_experts / moe_every_n_layers); this "
            "encoder implements nomic-embed-text-v2-moe, not the dense v1/v1.5 models"
        )
    kwargs = {ours: hub[theirs] for theirs, ours in _MAPPED.items() if hub.get(theirs) is not None}
    if hub.get("n_inner") is None:
        kwargs["ffn_size"] = 4 * hub["n_embd"]
    n_pos = hub.get("n_positions")
    if n_pos is not None and "max_positions" in kwargs and n_pos < kwargs["max_positions"]:
        kwargs["max_positions"] = n_pos
    for key in ("layer_norm_eps", "rotary_base"):
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    return EncoderConfig(**kwargs)


def load_config(model_dir: str | Path) -> EncoderConfig:
    """Read ``<model_dir>/config.json`` and map it with :func:`config_from_hub`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
    with path.open() as f:
        return config_from_hub(json.load(f))


def hub_config_dict(cfg: EncoderConfig, name: str = "random/nomic-moe") -> dict[str, Any]:
    """The hub ``config.json`` for ``cfg`` (inverse of :func:`config_from_hub`), real field set."""
    hub: dict[str, Any] = {
        "_name_or_path": name,
        "architectures": ["NomicBertModel"],
        "auto_map": {
            "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
            "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
        },
        "attn_pdrop": 0.0, "bos_token_id": None, "dense_seq_output": True, "embd_pdrop": 0.1,
        "eos_token_id": None, "fused_bias_fc": True, "fused_dropout_add_ln": True,
        "initializer_range": 0.02, "moe_impl": "megablocks", "moe_resid_pdrop": 0.0,
        "n_positions": cfg.max_positions, "pad_vocab_size_multiple": 64,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "router_aux_loss_coef": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32",
        "transformers_version": "4.44.2", "use_cache": True, "use_flash_attn": True,
        "use_rms_norm": None, "use_xentropy": True,
    }
    hub.update(_REQUIRED)
    hub.update({theirs: getattr(cfg, ours) for theirs, ours in _MAPPED.items()})
    return dict(sorted(hub.items()))


# Checks of run settings against a model's shape, made before any weight is loaded (the
# driver's pre-flight and plan, which do not import torch) and again where the weights are.


def check_dims(dims: Iterable[int], hidden_size: int) -> tuple[int, ...]:
    """Validate Matryoshka widths: integers in ``[1, hidden_size]``, no repeats, order kept."""
    dims = tuple(dims)
    if not dims:
        raise ValueError("dims must name at least one width")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= hidden_size:
            raise ValueError(f"width {d!r} is not an integer in [1, {hidden_size}] (model width)")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims {dims} repeat a width")
    return dims


def check_split(num_experts: int, world_size: int) -> None:
    """Raise unless ``world_size`` ranks can hold equal shares of ``num_experts`` experts."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"expert parallelism over {world_size} rank(s) needs a rank count that divides the "
            f"model's {num_experts} experts (e.g. {divisors(num_experts)})"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
