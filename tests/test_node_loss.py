"""A node lost mid-run (the spot preemption every large job meets), on a Ray cluster of three
nodes on this machine: the node that holds the encoder actor is removed while the run is going.
The run must end with every id once and the values exact, without a rerun when Ray recovers
(it runs the node's tasks again and restarts its actors elsewhere), and its summary names the
node; when Ray cannot recover, the run fails with exit 3 naming the lost node, and the same
command finishes it."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import summary
from pipeline.cli import main
from pipeline.cluster import session
from pipeline.jobs.run import describe_lost
from pipeline.plan import Cluster as Started
from tests.helpers import live_processes

DIMS = (64, 32)


def encoder_node(nodes) -> object | None:
    """The node (of ``nodes``) whose raylet started the encoder actor's worker process."""
    procs = live_processes()
    encoders = [pid for pid, (_, cmdline) in procs.items()
                if b"EncodeStage)" in cmdline]  # (TokenizeEncodeStage on CPU)
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        if any(procs[pid][0] == raylet for pid in encoders if pid in procs):
            return node
    return None


@pytest.mark.ray
@pytest.mark.slow
def test_a_node_lost_mid_run_costs_no_row(tmp_path, tiny_model_dir, embedder, caplog, capsys):
    import faulthandler

    import ray
    from ray.cluster_utils import Cluster

    rows = {s * 1000 + r: f"row {r} of shard {s}: " + "words " * (r % 7 + 1)
            for s in range(8) for r in range(60)}
    (tmp_path / "in").mkdir()
    for s in range(8):
        with open(tmp_path / "in" / f"shard-{s}.jsonl", "w") as f:
            for i in range(s * 1000, s * 1000 + 60):
                f.write(json.dumps({"id": i, "text": rows[i]}) + "\n")
    out = tmp_path / "out"
    lost, done = {}, threading.Event()
    # The run is in this process: a run that stalled would hang the suite, so it ends it
    # loudly instead (every thread's stack printed).
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
    cluster = None
    try:
        # The head runs nothing (the driver's node); two worker nodes of 2 CPUs each.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        cluster.wait_for_nodes()

        def preempt():
            """Once rows are being written, remove the node that holds the encoder actor
            (its raylet and workers get SIGTERM, as a preempted pod does)."""
            while not done.is_set() and "node" not in lost:
                if out.exists() and any(out.glob("part-*.parquet")):
                    node = encoder_node(workers)
                    if node is not None:
                        lost["node"] = node.node_id
                        lost["units_before"] = len(list((out / "_manifest").glob("unit-*")))
                        cluster.remove_node(node)
                done.wait(0.02)

        # Windows of 2 rows keep the encoder busy for seconds, so the node goes mid-run.
        argv = ["run", "--input", str(tmp_path / "in"), "--output", str(out), "--model",
                str(tiny_model_dir), "--dims", ",".join(map(str, DIMS)), "--address",
                cluster.address, "--window-rows", "2", "--rows-per-file", "10",
                "--progress", "off"]
        killer = threading.Thread(target=preempt, daemon=True)
        killer.start()
        with caplog.at_level("WARNING", logger="pipeline"):
            first = main(argv)
        done.set()
        killer.join(timeout=10)
        assert "node" in lost, "the encoder's node was never removed"
        assert lost["units_before"] < 8, "the node must go while units are still open"
        code = first
        if first == 3:  # Ray could not recover: the error names the node, the same command ends it
            err = capsys.readouterr().err
            assert "left the cluster during the run" in err and lost["node"][:12] in err
            code = main(argv)
        assert code == 0, caplog.text[-3000:]
    finally:
        done.set()
        faulthandler.cancel_dump_traceback_later()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    result = json.loads((out / "_summary.json").read_text())
    assert result["reconciled"] and result["rows_in"] == result["rows_embedded"] == 480
    if first == 0:  # finished in one run: it says what it went through
        assert [n["node_id"] for n in result["nodes_lost"]] == [lost["node"]]
        assert result["nodes_lost_count"] == 1
        assert "left the cluster during the run" in caplog.text
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 480 and set(ids) == set(rows)
    want = embedder.encode([rows[i] for i in ids], dims=DIMS)
    for d in DIMS:
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[d], atol=1e-5, rtol=0)


def test_lost_nodes_are_those_alive_at_the_start_and_gone_but_not_idle(monkeypatch):
    import ray

    started = Started(cpus=4, gpus=0, node_ids=("a" * 56, "b" * 56, "c" * 56, "d" * 56))
    now = [{"NodeID": "a" * 56, "Alive": True},
           {"NodeID": "b" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.2",
            "DeathReason": "AUTOSCALER_DRAIN_PREEMPTED", "DeathReasonMessage": "preempted"},
           {"NodeID": "c" * 56, "Alive": False, "DeathReason": "AUTOSCALER_DRAIN_IDLE"},
           {"NodeID": "e" * 56, "Alive": False}]  # joined later and went: not followed
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: now)
    gone = session.lost_nodes(started)
    assert gone == [{"node_id": "b" * 56, "address": "10.0.0.2", "reason": "preempted"},
                    {"node_id": "d" * 56, "address": "?", "reason": "no longer in the cluster"}]
    assert describe_lost(gone).startswith("2 node(s) left the cluster during the run (bbbbbbbbbbbb"
                                          " at 10.0.0.2: preempted; dddddddddddd at ?")
    many = describe_lost(gone * 4)
    assert many.startswith("8 node(s)") and many.endswith("; and 3 more)")

    def down():
        raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(ray, "nodes", down)  # a report only: never fails the run
    assert session.lost_nodes(started) == []
    assert session.lost_nodes(Started(cpus=4, gpus=0)) == []  # nothing known of the start


def test_the_summary_lists_a_bounded_number_of_lost_nodes():
    nodes = [{"node_id": f"{k:056x}", "address": "10.0.0.1", "reason": "preempted"}
             for k in range(summary.MAX_NODES_LOST + 30)]
    fields = summary.nodes_lost(nodes)
    assert len(fields["nodes_lost"]) == summary.MAX_NODES_LOST
    assert fields["nodes_lost_count"] == summary.MAX_NODES_LOST + 30
    assert summary.nodes_lost([]) == {"nodes_lost": [], "nodes_lost_count": 0}
