"""Our PyTorch implementation of nomic-embed-text-v2-moe (no remote code, no pickle)."""

from .checkpoint import CheckpointError, key_map, load_encoder, weight_files
from .config import (
    MAX_SEQ_LEN,
    EncoderConfig,
    UnsupportedConfigError,
    config_from_hub,
    hub_config_dict,
    load_config,
)
from .encoder import NomicMoEEncoder
from .packed import PackedBatch
from .pooling import check_dims, matryoshka, mean_pool

__all__ = [
    "MAX_SEQ_LEN", "CheckpointError", "EncoderConfig", "NomicMoEEncoder", "PackedBatch",
    "UnsupportedConfigError", "check_dims", "config_from_hub", "hub_config_dict", "key_map",
    "load_config", "load_encoder", "matryoshka", "mean_pool", "weight_files",
]
