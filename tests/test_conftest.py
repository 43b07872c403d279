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
def test_a_ray_test_may_start_ray():
    import ray

    # The session's one wrapper, passing calls through while a `ray` test runs.
    assert getattr(ray.init, "_refuses_unmarked_tests", False)
    assert conftest._UNMARKED["nodeid"] is None


def test_patching_ray_init_in_a_test_keeps_the_guard(monkeypatch):
    # A test that replaces ray.init (test_run_options::test_address) restores the wrapper when
    # it ends: the guard is installed once, not swapped in and out around each test.
    import ray

    guard = ray.init
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.undo()
    assert ray.init is guard and getattr(ray.init, "_refuses_unmarked_tests", False)
