"""Our PyTorch implementation of nomic-embed-text-v2-moe (no remote code, no pickle).

Names are imported lazily, so that ``pipeline.model.config`` and the pipeline's stage modules
can be imported without importing torch (a CPU encoder actor sets its thread count first).
"""

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "key_map": "checkpoint", "load_encoder": "checkpoint",
    "weight_files": "checkpoint",
    "MAX_SEQ_LEN": "config", "EncoderConfig": "config", "UnsupportedConfigError": "config",
    "config_from_hub": "config", "hub_config_dict": "config", "load_config": "config",
    "NomicMoEEncoder": "encoder", "PackedBatch": "packed",
    "check_dims": "config", "check_split": "config", "matryoshka": "pooling", "mean_pool": "pooling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
