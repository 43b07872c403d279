"""Batch embedding with nomic-embed-text-v2-moe: our own encoder, on Ray Data.

``pipeline.Embedder`` is the in-process API; ``pipeline.model`` the encoder itself.
"""

__all__ = ["Embedder"]


def __getattr__(name: str):
    # Lazy, so that light entry points (CLI --help, Ray glue) do not import torch up front.
    if name == "Embedder":
        from .embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
