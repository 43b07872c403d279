"""Expert parallelism (``--expert-parallel N``).

* The math: N ranks in a gloo process group (real processes), each holding E/N experts, give
  the single-process encoder's hidden states and routing (< 1e-5 fp32) on the hub reference's
  parity fixture and on random batches: uneven batches, ranks with no batch for a step, and
  experts that receive no token from some rank or from any rank.
* The Ray group: a rank that hangs fails the group when the collective times out, every rank
  is killed and the placement group released.
* The job: ``run --expert-parallel 2`` writes what the same run without it writes, and a rank
  SIGKILLed mid-run costs a group restart, not a row.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.model import PackedBatch, load_encoder
from pipeline.model.builder import sample_texts
from tests.helpers import ray_worker_pids

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


# -- N real processes in one gloo group ------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, job, queue) -> None:
    import torch.distributed as dist

    from pipeline.model.expert_parallel import init_group

    torch.set_num_threads(1)
    placement = init_group(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 60)
    try:
        queue.put((rank, job(placement)))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job) -> list:
    """``job(placement)`` on ``world`` spawned processes forming one gloo group; results by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    import queue as queues

    results, deadline = {}, time.monotonic() + 180
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, result = queue.get(timeout=0.5)
                results[rank] = result
            except queues.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed, f"a rank process failed (exit codes {failed})"
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * world
    return [results[r] for r in range(world)]


def _forward(encoder, seqs) -> dict:
    """Hidden states and per-layer expert counts of one packed batch (None: an idle step)."""
    if seqs is None:
        encoder.forward_idle()
        return None
    batch = PackedBatch.from_sequences(seqs)
    routing = []
    with torch.inference_mode():
        hidden = encoder.forward_packed(batch, routing_out=routing)
    counts = [torch.bincount(r.topk_ids_TK.reshape(-1), minlength=r.probs_TE.shape[1]).tolist()
              for r in routing]
    received = [block.ffn.last_exchange[1] for block in encoder.layers
                if hasattr(block.ffn, "last_exchange")]
    return {"hidden": hidden.float().numpy(), "counts": counts, "received": received}


def random_steps(world: int, rank: int, vocab: int) -> list:
    """Per step, this rank's sequences (None: no batch). Uneven on purpose: rank r has r + 1
    random batches of its own size; then every rank runs one identical 1-token sequence, so
    the same 2 experts get every token and the others none at all; the last rank ends early."""
    gen = torch.Generator().manual_seed(100 + rank)
    steps = []
    for step in range(world + 1):
        if step > rank:
            steps.append(None)
            continue
        n = 1 + (rank + step) % 4
        steps.append([torch.randint(4, vocab, (int(torch.randint(1, 60, (1,), generator=gen)),),
                                    generator=gen).tolist() for _ in range(n)])
    steps.append([[7]])
    if rank == world - 1:
        steps[-1] = None  # and this rank sits the identical step out
    return steps


def parity_and_random_job(placement, fixture_dir: str, model_dir: str, dtypes: tuple) -> dict:
    rank, world = placement.rank, placement.world_size
    out = {}
    # The hub reference's fixture: rank r runs the sequences i with i % world == r, then
    # rank 0 runs all of them while the others sit idle.
    enc = load_encoder(fixture_dir, placement=placement)
    out["experts_held"] = [tuple(b.ffn.w1_EFD.shape) for b in enc.layers if hasattr(b.ffn, "idle")]
    inputs = json.loads((Path(fixture_dir) / "inputs.json").read_text())
    seqs = [ids[:n] for ids, n in zip(inputs["input_ids"], inputs["lengths"])]
    mine = [s for i, s in enumerate(seqs) if i % world == rank]
    out["fixture"] = [_forward(enc, mine or None), _forward(enc, seqs if rank == 0 else None)]
    for dtype in dtypes:
        enc = load_encoder(model_dir, dtype=getattr(torch, dtype), placement=placement)
        steps = random_steps(world, rank, enc.config.vocab_size)
        out[dtype] = [_forward(enc, s) for s in steps]
    return out


@pytest.mark.parametrize("world,dtypes", [(2, ("float32", "bfloat16")), (4, ("float32",))])
def test_ranks_equal_the_single_process_encoder(world, dtypes, parity_fixture_dir,
                                                tiny_model_dir):
    job = functools.partial(parity_and_random_job, fixture_dir=str(parity_fixture_dir),
                            model_dir=str(tiny_model_dir), dtypes=dtypes)
    results = run_ranks(world, job)
    from safetensors.torch import load_file

    # Each rank holds E / world experts of every MoE layer.
    for res in results:
        assert {shape[0] for shape in res["experts_held"]} == {4 // world}
    # The fixture: the hub reference's own hidden states, row by row.
    inputs = json.loads((parity_fixture_dir / "inputs.json").read_text())
    expected = load_file(str(parity_fixture_dir / "expected.safetensors"))["last_hidden_state"]
    want = [expected[i, :n].numpy() for i, n in enumerate(inputs["lengths"])]
    for rank, res in enumerate(results):
        mine = [want[i] for i in range(len(want)) if i % world == rank]
        first, second = res["fixture"]
        assert (first is None) == (not mine)
        if mine:
            assert np.abs(first["hidden"] - np.concatenate(mine)).max() < TOL
        if rank == 0:
            assert np.abs(second["hidden"] - np.concatenate(want)).max() < TOL
    # Random batches against the single-process encoder, same dtype.
    single = {d: load_encoder(tiny_model_dir, dtype=getattr(torch, d)) for d in dtypes}
    tol = {"float32": TOL, "bfloat16": 0.05}
    empty_expert_on_a_rank = False
    for dtype in dtypes:
        vocab = single[dtype].config.vocab_size
        for rank, res in enumerate(results):
            for seqs, got in zip(random_steps(world, rank, vocab), res[dtype], strict=True):
                assert (seqs is None) == (got is None)
                if seqs is None:
                    continue
                ref = _forward(single[dtype], seqs)
                assert got["counts"] == ref["counts"]  # the same routing
                assert np.abs(got["hidden"] - ref["hidden"]).max() < tol[dtype], (dtype, rank)
        # The identical 1-token step: 2 of the 4 experts get every slot, so the ranks holding
        # only the other experts received no token at all in that step.
        last = [res[dtype][-1] for res in results if res[dtype][-1] is not None]
        empty_expert_on_a_rank |= any(0 in r["received"] for r in last)
        assert all(sorted(c)[:2] == [0, 0] for r in last for c in r["counts"])
    assert empty_expert_on_a_rank or world == 2


def test_an_expert_count_that_does_not_divide_is_refused():
    from pipeline.model.expert_parallel import ExpertGroup
    from pipeline.model.config import check_split

    with pytest.raises(ValueError, match=r"divides the model's 8 experts \(e.g. \[1, 2, 4, 8\]\)"):
        check_split(8, 3)
    assert ExpertGroup(2, 4).experts(8) == (4, 6)


# -- the Ray group ---------------------------------------------------------------------------


def _load(model_dir) -> dict:
    return dict(model=str(model_dir), revision=None, device="cpu", dtype="float32",
                max_tokens_per_batch=512, storage_options={}, fingerprint=None)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pids, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


@pytest.fixture(scope="module")
def window(embedder):
    texts = [f"{t} {i}" for i, t in enumerate(sample_texts()[:40])]
    batch = embedder.tokenize(texts)
    return batch, embedder.embed_tokenized(batch, (64, 32))


@pytest.mark.ray
def test_a_hung_rank_fails_the_group_in_bounded_time(cluster, tiny_model_dir, window):
    import ray

    from pipeline.cluster.expert_groups import GroupFailed, RankGroup

    batch, _ = window
    # A rank that stops answering: the other rank's collective times out (2 s here).
    group = RankGroup(2, _load(tiny_model_dir), rank_cpus=0.5, timeout_s=2, restarts=0)
    group.start()
    pids = [info["pid"] for info in group.info]
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(GroupFailed, match="rank 0 of 2 failed while encoding"):
        group.embed_tokenized(batch, (64, 32), group.plan(batch.lengths))
    assert time.monotonic() - t0 < 30
    assert _gone(pids), "every rank of a failed group is killed"
    assert group.pg is None and not group.ranks

    assert all(info["state"] == "REMOVED" for info in ray.util.placement_group_table().values())
    # A SIGKILLed rank is seen at once and costs a group restart: the last test below.


# -- the job ---------------------------------------------------------------------------------


def write_corpus(root: Path, shards: int, rows: int) -> dict[int, str]:
    texts = sample_texts()
    root.mkdir(parents=True)
    by_id = {}
    for s in range(shards):
        ids = list(range(s * rows, (s + 1) * rows))
        chunk = [f"{texts[i % len(texts)]} #{i}" for i in ids]
        by_id.update(zip(ids, chunk))
        pq.write_table(pa.table({"id": ids, "text": chunk}), root / f"shard-{s}.parquet")
    return by_id


def read_output(out: Path) -> tuple[pa.Table, dict]:
    summary = json.loads((out / "_summary.json").read_text())
    parts = sorted(out.glob("part-*.parquet"))
    assert sorted(str(p) for p in parts) == sorted(
        f.removeprefix("file://") for f in summary["output_files"]), "stray files left"
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("id"), summary


@pytest.mark.ray
def test_run_with_expert_parallel_equals_the_plain_run(cluster, tmp_path, tiny_model_dir):
    import ray

    from pipeline.config import RunConfig
    from pipeline.jobs.run import run

    write_corpus(tmp_path / "in", shards=2, rows=30)
    common = dict(input=str(tmp_path / "in"), model=str(tiny_model_dir), dims=(64, 32),
                  progress="off", window_rows=16)
    run(RunConfig(output=str(tmp_path / "plain"), **common))
    run(RunConfig(output=str(tmp_path / "ep"), expert_parallel=2, **common))
    plain, _ = read_output(tmp_path / "plain")
    ep, summary = read_output(tmp_path / "ep")
    assert ep["id"].to_pylist() == plain["id"].to_pylist() == list(range(60))
    for d in (64, 32):
        a, b = (np.stack(t[f"embedding_{d}"].to_numpy(zero_copy_only=False)) for t in (plain, ep))
        assert np.abs(a - b).max() < TOL
    assert summary["model"]["expert_parallel"] == 2 and summary["reconciled"]
    # The groups' placement groups are released when the run ends.
    assert all(info["state"] == "REMOVED" for info in ray.util.placement_group_table().values())


def rank_pids(cluster: str, doing: bytes = b"") -> list[int]:
    """Processes of expert-parallel ranks of this module's cluster (Ray titles them
    ``ray::ExpertRank.<method>``)."""
    return ray_worker_pids(cluster, b"ray::ExpertRank" + doing)


@pytest.mark.ray
def test_a_rank_killed_mid_run_costs_a_restart_not_a_row(cluster, tmp_path, tiny_model_dir,
                                                         embedder):
    texts = write_corpus(tmp_path / "in", shards=4, rows=40)
    out = tmp_path / "out"
    # Windows of 2 rows make hundreds of group calls; units commit as their files are written.
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "in"),
           "--output", str(out), "--model", str(tiny_model_dir), "--dims", "64,32",
           "--address", cluster, "--progress", "off", "--expert-parallel", "2",
           "--window-rows", "2", "--rows-per-file", "15"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    victim, committed = None, 0
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        encoding = rank_pids(cluster, b".encode")
        if encoding:  # a rank is inside a window
            committed = len(list((out / "_manifest").glob("unit-*")))
            victim = encoding[0]
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=240)
    log = log_path.read_text()
    assert victim is not None, "no rank was seen mid-run"
    assert proc.returncode == 0, log[-3000:]
    assert "starting a new group and retrying the window" in log, log[-3000:]
    # The group saw the death at once (the bound: the collective timeout, 300 s).
    seen = re.search(r"rank \d of 2 failed while encoding after ([0-9.]+) s", log)
    assert seen and float(seen.group(1)) < 30, log[-3000:]
    assert committed < 4, "the kill must land with work left"
    table, summary = read_output(out)
    ids = table["id"].to_pylist()
    assert ids == sorted(texts), "every id exactly once"
    want = embedder.encode([texts[i] for i in ids], dims=(64, 32))
    for d in (64, 32):
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[d], atol=TOL, rtol=0)
    assert summary["reconciled"] and summary["rows_embedded"] == 160
    assert len(list((out / "_manifest").glob("unit-*"))) == 4


@pytest.mark.parametrize("job", ["run", "nightly", "enrich"])
def test_every_job_takes_the_option(job):
    from pipeline.cli import build_parser
    from pipeline.cli import config_from_args

    args = build_parser().parse_args([job, "--input", "in/", "--output", "out/",
                                      "--expert-parallel", "4"])
    assert config_from_args(args).expert_parallel == 4


def test_a_group_removed_while_the_orphans_are_swept_is_left_out(monkeypatch):
    # A killed rank's encode actor removes its own group while a new actor sweeps orphans: the
    # group is still in the table read a moment before, and looking it up by name then fails.
    from pipeline.cluster import expert_groups as G

    table = {1: {"name": "run-x-aa-1", "state": "CREATED"},
             2: {"name": "run-x-bb-2", "state": "CREATED"},
             3: {"name": "run-x-cc-3", "state": "REMOVED"}, 4: {"name": "other-dd-4"}}
    monkeypatch.setattr(G, "placement_group_table", lambda: table)

    def lookup(name):
        if name == "run-x-aa-1":
            raise ValueError(f"Failed to look up placement group with name: {name}")
        return f"pg:{name}"

    monkeypatch.setattr(G, "get_placement_group", lookup)
    removed = []
    monkeypatch.setattr(G, "remove_placement_group", removed.append)
    assert G._groups("run-x") == [("pg:run-x-bb-2", "run-x-bb-2")]
    assert G.release_groups("run-x") == 1 and removed == ["pg:run-x-bb-2"]
