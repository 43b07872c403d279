"""Committing a night's units, gathering first those whose rows the shuffle scattered.

A night's shuffle deals a unit's rows to about one write per bucket of the diff, so a unit
read whole (every unit on a first night) would be committed in that many small part files.
:class:`UnitGatherer` takes the units the tracker completes: a unit whose rows are in more
part files than they need (``pipeline/stages/carry.py::gathering``) waits for the graph to
finish, is then copied into part files of its files' rows together by a Ray task, and is
committed with those once the task is done; the others are committed at once. The part files
written first are then named by no manifest, and the run deletes them with its other strays
(as it deletes a failed write's). Gathering while the graph ran took CPUs from its last
stages: at 30,000 files and 3M rows on 2 cores that first night took 45 s longer than
without gathering, against 24 s with the gathering after the graph (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Callable

import ray

from ..stages.carry import gather_unit, gathering


@ray.remote(num_cpus=1, max_retries=3)
def _gather(unit: dict[str, Any], output_uri: str, storage_options: dict[str, Any],
            rows_per_file: int) -> dict[str, Any] | None:
    return gather_unit(unit, output_uri, storage_options, rows_per_file)


class UnitGatherer:
    """The tracker's commit (``commit``): ``publish`` a unit's manifest now, or once its
    rows are gathered, after the graph (:meth:`drain`). Units in ``skip`` (a touched unit:
    part of its rows copied, the rest written by the graph) are never gathered.
    :meth:`start` starts the gatherings of the units queued, :meth:`drain` starts them and
    commits each unit as its task is done, :meth:`cancel` stops them (a failed run: none may
    write after it). ``gathered`` has the manifests committed after a gathering (without
    their slices, as the tracker keeps units), by unit key."""

    def __init__(self, publish: Callable[[dict[str, Any]], Any], output_uri: str,
                 storage_options: dict[str, Any], rows_per_file: int) -> None:
        self.publish, self.output_uri = publish, output_uri
        self.storage_options, self.rows_per_file = storage_options, rows_per_file
        self.skip: frozenset[str] = frozenset()
        self.gathered: dict[str, dict[str, Any]] = {}
        self._queued: list[dict[str, Any]] = []  # units to gather once the graph is done
        self._pending: dict[Any, str] = {}  # task -> unit key

    def commit(self, unit: dict[str, Any]) -> None:
        job = None if unit["unit"] in self.skip \
            else gathering(unit, self.output_uri, self.rows_per_file)
        if job is None:
            self.publish(unit)
        else:  # its slices queued as arrays (16 bytes a slice), not as the manifest's lists
            self._queued.append(unit | {"slices": dict(job.parts)})

    def start(self) -> None:
        """Submit the gatherings of the units queued so far."""
        for unit in self._queued:
            ref = _gather.remote(unit, self.output_uri, self.storage_options,
                                 self.rows_per_file)
            self._pending[ref] = unit["unit"]
        self._queued.clear()

    def _take(self) -> None:
        """Wait for a gathering to be done, and commit its unit."""
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        for ref in ready:
            key = self._pending.pop(ref)
            unit = ray.get(ref)
            if unit is None:  # gathering() said yes on the driver: it cannot say no there
                raise RuntimeError(f"internal error: unit {key} was not gathered")
            self.publish(unit)
            self.gathered[key] = {k: v for k, v in unit.items() if k != "slices"}

    def drain(self) -> None:
        """Gather the units queued, committing each as its task is done."""
        self.start()
        while self._pending:
            self._take()

    def cancel(self) -> None:
        """Stop the gatherings left and wait until none runs (their files, named by no
        manifest, are strays the next attempt deletes)."""
        refs = list(self._pending)
        self._pending.clear()
        self._queued.clear()
        for ref in refs:
            ray.cancel(ref, force=True)
        for ref in refs:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001, S110 - cancelled or failed: either way, done
                pass
