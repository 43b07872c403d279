"""Plain Ray tasks: one call of a function per argument tuple, across the cluster."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import ray


def map_tasks(fn: Callable[..., Any], calls: Iterable[tuple], *, num_cpus: float = 1.0,
              max_retries: int = 3) -> list[Any]:
    """``[fn(*args) for args in calls]``, each call a Ray task (retried ``max_retries`` times
    when its worker dies), results in order. The first failing call's error is raised, as
    Ray raises it (``pipeline.errors.root_cause`` finds the function's own)."""
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    return ray.get([task.remote(*args) for args in calls])
