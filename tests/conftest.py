"""Shared fixtures: the team's parity fixture and tiny random-weight model directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# CI clones the repo with the team's shared/ folder beside it.
SHARED = Path(os.environ.get("NOMIC_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
PARITY_FIXTURE = SHARED / "fixtures" / "nomic-moe-tiny"


@pytest.fixture(scope="session")
def parity_fixture_dir() -> Path:
    if not (PARITY_FIXTURE / "expected.safetensors").is_file():
        pytest.fail(f"parity fixture not found at {PARITY_FIXTURE} (set NOMIC_SHARED_DIR)")
    return PARITY_FIXTURE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete hub-layout tiny model (weights, config, tokenizer) built offline."""
    from pipeline.model.builder import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare fp32 results at 1e-5; keep intra-op threading fixed across tests.
    torch.manual_seed(0)
    yield
