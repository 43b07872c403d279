"""The test suite's own rules (``tests/conftest.py``): the parity fixture is in the repository,
and a test not marked ``ray`` cannot start Ray, so ``-m "not ray"`` starts none."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest


def test_the_parity_fixture_is_in_the_repository():
    folder = Path(__file__).resolve().parent / "fixtures" / "nomic-moe-tiny"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "expected.safetensors", "inputs.json", "model.safetensors"]
    assert conftest.FIXTURES / "nomic-moe-tiny" == folder


def test_an_unmarked_test_cannot_start_ray():
    import ray

    try:
        with pytest.raises(RuntimeError, match=r"starts Ray \(ray.init\) but is not marked `ray`"):
            ray.init(num_cpus=1, include_dashboard=False)
    finally:
        if ray.is_initialized():  # the guard failed: leave no Ray behind
            ray.shutdown()
    assert not ray.is_initialized()


@pytest.mark.ray
def test_a_ray_test_gets_the_real_ray_init():
    import ray

    assert ray.init.__module__ == "ray._private.worker"
