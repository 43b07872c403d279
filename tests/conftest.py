"""Shared fixtures: the team's parity fixture and tiny random-weight model directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.s3server import s3_endpoint  # noqa: F401 - the cluster fixture's dependency

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


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> str:
    """A local Ray cluster for one test module, started after the fake AWS credentials (its
    workers inherit them); yields its address for drivers started as subprocesses."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    """The tiny model's in-process encoder (fp32): the values the pipeline must reproduce."""
    from pipeline import Embedder

    return Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare fp32 results at 1e-5; keep intra-op threading fixed across tests.
    torch.manual_seed(0)
    yield
