"""Shared fixtures: the parity fixture, tiny random-weight model directories, the module
Ray cluster, and the ``ray`` marker's guard (a test not marked ``ray`` may not start Ray)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from tests.s3server import s3_endpoint  # noqa: F401 - the cluster fixture's dependency

# The parity fixture lives in the repository (tests/fixtures/); NOMIC_SHARED_DIR, when set,
# names a shared folder whose fixtures/nomic-moe-tiny is used instead.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_FIXTURE = (Path(os.environ["NOMIC_SHARED_DIR"]) / "fixtures" if os.environ.get(
    "NOMIC_SHARED_DIR") else FIXTURES) / "nomic-moe-tiny"
# Fixtures that start (or connect to) a Ray: a test using one must be marked ``ray``.
RAY_FIXTURES = ("cluster", "ray_head")


@pytest.fixture(scope="session")
def parity_fixture_dir() -> Path:
    if not (PARITY_FIXTURE / "expected.safetensors").is_file():
        pytest.fail(f"parity fixture not found at {PARITY_FIXTURE} (tests/fixtures/ is part of "
                    "the repository; NOMIC_SHARED_DIR, if set, must hold fixtures/nomic-moe-tiny)")
    return PARITY_FIXTURE


@pytest.fixture(scope="session")
def tokenizer_json(tiny_model_dir) -> str:
    """The tiny model's tokenizer, as the stages take it."""
    return (tiny_model_dir / "tokenizer.json").read_text()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete hub-layout tiny model (weights, config, tokenizer) built offline."""
    from pipeline.model.builder import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


# The item pytest runs after the one being torn down (see pytest_runtest_teardown below), and
# the modules with a test that uses the `cluster` fixture (found at collection).
_NEXT: dict[str, pytest.Item | None] = {"item": None}
_CLUSTER_MODULES: set[Path] = set()


def _uses_cluster(item: pytest.Item | None) -> bool:
    return item is not None and "cluster" in getattr(item, "fixturenames", ())


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> str:
    """A local Ray cluster, started after the fake AWS credentials (its workers inherit them);
    yields its address for drivers started as subprocesses. One cluster serves consecutive
    modules that use this fixture (collection puts them together): it is shut down after a
    module's last test unless the next module uses it too, so every other module starts
    with no Ray, as before (a cluster's start and first workers cost seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # address="local": a Ray of its own, even where another one runs on the machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    following = _NEXT["item"]
    if following is None or following.path not in _CLUSTER_MODULES:
        ray.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    _NEXT["item"] = nextitem
    yield


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


# ---------------------------------------------------------------------------------------------
# The ``ray`` marker: ``-m "not ray"`` must start no Ray. A test that is not marked ``ray`` and
# uses a Ray fixture fails at collection; one that calls ``ray.init`` (directly, through a job
# or through a fixture being set up for it) fails with a message saying so.


# The slowest modules first (a stable sort: each module's own order is kept), so that a run
# split over processes (pytest-xdist `-n 2 --dist loadfile`) starts the long ones at once, and
# the quick unit tests of a serial run report last, after the Ray modules.
SLOWEST_FIRST = ("test_nightly.py", "test_resume_faults.py", "test_ray_job.py",
                 "test_expert_parallel.py", "test_enrich.py", "test_pipeline_e2e.py",
                 "test_demo.py", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    # The modules that share the `cluster` fixture's Ray first, then the others by the order
    # above (a stable sort: each module's own order is kept).
    shared = _CLUSTER_MODULES
    shared |= {item.path for item in items if _uses_cluster(item)}
    items.sort(key=lambda item: (item.path not in shared, SLOWEST_FIRST.index(item.path.name)
                                 if item.path.name in SLOWEST_FIRST else len(SLOWEST_FIRST),
                                 str(item.path) if item.path in shared else ""))
    unmarked = [item.nodeid for item in items if item.get_closest_marker("ray") is None
                and set(RAY_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("tests using a Ray fixture (" + ", ".join(RAY_FIXTURES) +
                                ") must be marked `ray`: " + ", ".join(unmarked))


class RayStartedByUnmarkedTest(RuntimeError):
    pass


# The test running now, while it is not marked ``ray`` (None otherwise). ``ray.init`` is wrapped
# once for the session, so a test that monkeypatches ``ray.init`` itself restores the wrapper.
_UNMARKED: dict[str, str | None] = {"nodeid": None}


def _guard_ray_init() -> None:
    import ray  # importing ray starts nothing

    real = ray.init
    if getattr(real, "_refuses_unmarked_tests", False):
        return

    def init(*args, **kwargs):
        if _UNMARKED["nodeid"]:
            raise RayStartedByUnmarkedTest(f"{_UNMARKED['nodeid']} starts Ray (ray.init) but is "
                                           "not marked `ray`; mark it with @pytest.mark.ray")
        return real(*args, **kwargs)

    init._refuses_unmarked_tests = True
    ray.init = init


_guard_ray_init()


@contextlib.contextmanager
def _no_ray_unless_marked(item):
    _UNMARKED["nodeid"] = None if item.get_closest_marker("ray") is not None else item.nodeid
    try:
        yield
    finally:
        _UNMARKED["nodeid"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_ray_unless_marked(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_ray_unless_marked(item):
        yield
